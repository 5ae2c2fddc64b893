"""Issue 17: the heads' schedule (a budget of optimiser steps), the shared neighbour graph, and the
label-free warning of ``--method tsp|temi`` (library function and its hook in itae-cluster)."""

import json
import math

import imagefolders
import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")

from itae_export.cli.cluster import main as cluster_cli  # noqa: E402
from itae_export.cluster.evaluation import (  # noqa: E402
    ADVICE_THRESHOLD,
    head_advice,
    kmeans_neighbour_agreement,
)
from itae_export.cluster.heads import (  # noqa: E402
    TEMI_DEFAULTS,
    TSP_DEFAULTS,
    fit_head,
    nearest_neighbors,
    schedule,
    temi_step_flops,
)
from itae_export.cluster.metrics import l2_normalize  # noqa: E402
from itae_export.errors import InputError  # noqa: E402


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def blobs(n_per=50, k=4, dim=16, spread=0.12, seed=0):
    rng = np.random.default_rng(seed)
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:k] * 3
    x = np.concatenate([c + spread * 3 * rng.normal(size=(n_per, dim)) for c in centres])
    return x.astype(np.float32), np.repeat(np.arange(k), n_per)


# ---------------------------------------------------------------- schedule


@pytest.mark.parametrize("method", ["tsp", "temi"])
def test_schedule_small_collections_get_the_step_budget(method):
    d = TSP_DEFAULTS if method == "tsp" else TEMI_DEFAULTS
    for n in (300, 1797, 5000, 20000):
        plan = schedule(n, d["batch_size"], None, d["min_epochs"], d["min_steps"])
        assert plan["steps_per_epoch"] == math.ceil(n / d["batch_size"])
        assert plan["steps"] == plan["epochs"] * plan["steps_per_epoch"]
        assert plan["steps"] >= d["min_steps"] and plan["epochs"] >= d["min_epochs"]
        # no more than one epoch beyond what the budget or the paper's epochs need
        assert plan["epochs"] == max(d["min_epochs"], math.ceil(d["min_steps"] / plan["steps_per_epoch"]))
    # the paper's collection size (CIFAR, 50,000 images): the paper's epochs, unchanged
    assert schedule(50000, 256, None, d["min_epochs"], d["min_steps"])["epochs"] == d["min_epochs"]


def test_schedule_by_hand_and_explicit_epochs():
    assert schedule(1797, 256, None, 100, 2000) == {"epochs": 250, "steps_per_epoch": 8, "steps": 2000}
    assert schedule(50000, 256, None, 100, 2000) == {"epochs": 100, "steps_per_epoch": 196, "steps": 19600}
    assert schedule(1797, 256, 7, 100, 2000) == {"epochs": 7, "steps_per_epoch": 8, "steps": 56}
    with pytest.raises(InputError, match="epochs"):
        schedule(100, 10, -1, 1, 1)


def test_fit_runs_the_scheduled_epochs_and_records_them():
    x, _ = blobs(n_per=10)  # 40 points, 3 batches of 16 per epoch
    r = fit_head(x, 4, "tsp", progress=False, batch_size=16, min_epochs=2, min_steps=30, n_neighbors=5,
                 kmeans_n_init=1)
    assert r.schedule == {"epochs": 10, "steps_per_epoch": 3, "steps": 30}
    assert len(r.history) == 10
    r = fit_head(x, 4, "tsp", progress=False, batch_size=16, epochs=3, n_neighbors=5, kmeans_n_init=1)
    assert r.schedule["epochs"] == 3 and len(r.history) == 3


def test_step_budget_moves_the_tsp_head_where_paper_epochs_do_not():
    """200 points: the paper's 100 epochs are 100 steps; the default budget gives 2,000 (the paper's
    linear layer, one head: it starts near uniform predictions and must move)."""
    x, _ = blobs(n_per=50)
    paper = dict(lr=1e-4, kmeans_n_init=1, n_heads=1, temperature=None)
    few = fit_head(x, 4, "tsp", progress=False, epochs=100, **paper)
    budget = fit_head(x, 4, "tsp", progress=False, **paper)
    assert budget.schedule["steps"] == TSP_DEFAULTS["min_steps"]
    # the neighbour-consistency term (log k = 1.39 at uniform predictions) goes down with the budget
    assert budget.history[-1]["consistency"] < few.history[-1]["consistency"] - 0.3


# ---------------------------------------------------------------- neighbour graph and cost model


def test_precomputed_neighbors_give_the_same_fit_and_are_checked():
    x, _ = blobs(n_per=15)
    graph = nearest_neighbors(l2_normalize(x).astype(np.float32), 12)
    hp = dict(epochs=3, batch_size=16, n_neighbors=6, kmeans_n_init=1)
    a = fit_head(x, 4, "tsp", progress=False, **hp)
    b = fit_head(x, 4, "tsp", progress=False, neighbors=graph, **hp)
    np.testing.assert_array_equal(a.probs_, b.probs_)
    with pytest.raises(InputError, match="columns"):
        fit_head(x, 4, "tsp", progress=False, neighbors=(graph[0][:, :3], graph[1][:, :3]), **hp)


def test_temi_step_flops_by_hand():
    # 2 rows, D=3, h=4, k=2, 1 head: forward 3*4 + 4*4 + 4*2 = 36 MACs per row, twice (student,
    # teacher); backward 12 (dW1) + 32 (dW2, dX2) + 16 (dW3, dX3) = 60; x2 FLOPs x 2 rows.
    assert temi_step_flops(2, 3, 2, 1, 4) == 2 * 2 * (2 * 36 + 60)
    assert temi_step_flops(2, 3, 2, 5, 4) == 5 * temi_step_flops(2, 3, 2, 1, 4)


# ---------------------------------------------------------------- the warning


def test_head_advice_quiet_on_clusters_warns_on_noise():
    x, _ = blobs()
    good = head_advice(x, 4, "tsp", graph_neighbors=TSP_DEFAULTS["n_neighbors"])
    assert good.warning is None and good.estimate > 0.95
    assert good.neighbors[1].shape == (len(x), 20)
    noise = np.random.default_rng(0).normal(size=(400, 64)).astype(np.float32)
    bad = head_advice(noise, 10, "temi", graph_neighbors=50)
    assert bad.estimate < ADVICE_THRESHOLD and bad.neighbors[1].shape == (400, 50)
    assert bad.warning.startswith("--method temi:") and "may not beat K-Means" in bad.warning
    assert bad.as_dict()["warning"] == bad.warning
    # the estimate is K-Means-label agreement among the 20 nearest neighbours, nothing else
    assert bad.estimate == pytest.approx(kmeans_neighbour_agreement(noise, 10, neighbors=bad.neighbors))


def test_cluster_job_logs_and_records_the_advice(tiny_model, tmp_path, monkeypatch):
    """The hook in run_cluster_job: the warning goes to the log and into summary["head"]."""
    from itae_export.cluster import job

    seen = []

    def strict(*args, **kwargs):  # a threshold no data meets, so that the warning must appear
        seen.append(kwargs)
        return head_advice(*args, **kwargs, threshold=1.01)

    monkeypatch.setattr(job, "head_advice", strict)
    imagefolders.fashion_folder(tmp_path / "q", per_class=8, classes=3)
    res = CliRunner().invoke(cluster_cli, [str(a) for a in (
        tmp_path / "q", "--onnx", tiny_model, "--k", 3, "--method", "tsp", "--epochs", 2, "--out", tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert seen and seen[0]["graph_neighbors"] == TSP_DEFAULTS["n_neighbors"]
    head = json.loads((tmp_path / "out" / "summary.json").read_text())["head"]
    advice = head["neighbour_advice"]
    assert advice["threshold"] == 1.01 and 0 <= advice["kmeans_neighbour_agreement"] <= 1
    assert advice["warning"].startswith("--method tsp: only") and advice["warning"] in res.stderr
    assert head["schedule"] == {"epochs": 2, "steps_per_epoch": 1, "steps": 2}
    # the head's plan is logged before it trains (issue 24): here too short to time, one thread
    assert "TSP: 2 optimiser steps (2 epochs of 1) on 24 x" in res.stderr and "1 thread;" in res.stderr


def test_tsp_beats_kmeans_by_five_points_on_digits():
    """Issue 17's bar on one seed, on a set where neighbours agree with the labels (kNN@20 0.94) and
    K-Means is 15 points short of them: the default TSP (10 cosine heads side by side, the lowest
    loss kept) beats K-Means ACC by >= 5 points. The paper's single linear head gained 3.7 here.
    bench/bench_heads.py runs it over 3 seeds and more sets."""
    from sklearn.cluster import KMeans
    from sklearn.datasets import load_digits

    from itae_export.cluster.metrics import cluster_accuracy

    x, y = load_digits(return_X_y=True)
    x = x.astype(np.float32)
    km = cluster_accuracy(y, KMeans(10, n_init=10, random_state=0).fit_predict(l2_normalize(x)))
    tsp = cluster_accuracy(y, fit_head(x, 10, "tsp", seed=0, progress=False).labels_)
    assert tsp >= km + 0.05, (tsp, km)


# ---------------------------------------------------------------- threads and the estimate (issue 24)


def test_choose_threads_times_each_count_picks_the_fastest_and_restores_everything():
    """The trial runs the step with torch and the BLAS pools at the same count, picks by the time
    it measured, and leaves the weights and both thread settings as it found them."""
    import time as _time

    from threadpoolctl import threadpool_info

    from itae_export.cluster.heads import choose_threads

    w = torch.zeros(3)
    seen = []

    def step():  # slower on one thread: the measurement, not a rule, must pick 2
        n = torch.get_num_threads()
        blas = {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}
        seen.append((n, blas))
        w.add_(1.0)
        _time.sleep(0.02 if n == 1 else 0.002)

    before = (torch.get_num_threads(), [p["num_threads"] for p in threadpool_info()])
    choice = choose_threads(step, [w], total_steps=1000, cores=2)
    assert choice["threads"] == 2 and set(choice["seconds_per_step"]) == {1, 2}
    assert choice["seconds_per_step"][1] > choice["seconds_per_step"][2]
    assert choice["estimate_s"] == pytest.approx(1000 * choice["seconds_per_step"][2])
    assert all(blas <= {n} for n, blas in seen) and {n for n, _ in seen} == {1, 2}  # set together
    assert torch.equal(w, torch.zeros(3))  # the throwaway steps are undone
    assert (torch.get_num_threads(), [p["num_threads"] for p in threadpool_info()]) == before
    # a fixed count is only timed; a fit too short to be worth a trial gets one thread, untimed
    assert choose_threads(step, [w], 1000, threads=1)["seconds_per_step"].keys() == {1}
    assert choose_threads(step, [w], 10) == {"threads": 1, "seconds_per_step": {}, "estimate_s": None}
    with pytest.raises(InputError, match="threads"):
        choose_threads(step, [w], 1000, threads=0)


@pytest.mark.parametrize("method", ["tsp", "temi"])
def test_fit_head_logs_its_estimate_before_training_and_records_the_threads(method):
    x, _ = blobs()
    events = []
    hp = {"n_heads": 2, "n_neighbors": 5, "min_steps": 80, "min_epochs": 1, "batch_size": 64}
    if method == "temi":
        hp["hidden_dim"] = 16
    r = fit_head(x, 4, method, seed=0, log=lambda m: events.append(("log", m)),
                 progress=lambda e, n, info: events.append(("epoch", e)), **hp)
    assert events[0][0] == "log" and events[1] == ("epoch", 1)
    msg = events[0][1]
    assert msg.startswith(method.upper() + ": 80 optimiser steps (20 epochs of 4) on 200 x 16") and "about" in msg
    assert r.threads["threads"] in r.threads["seconds_per_step"] and r.threads["estimate_s"] > 0
    assert r.threads["seconds"] > 0
    # a fixed thread count gives the same head as the same count chosen by the trial
    fixed = fit_head(x, 4, method, seed=0, progress=False, threads=r.threads["threads"], **hp)
    np.testing.assert_array_equal(fixed.probs_, r.probs_)


def test_training_drops_to_one_thread_when_the_machine_gets_busier():
    """Two threads chosen in the trial, then an epoch runs slower than one thread did there: the
    rest of the fit runs on one thread, logged and recorded; the settings are restored at the end."""
    import time as _time

    from itae_export.cluster.heads import FALLBACK_SLOWDOWN, _TrainingThreads

    before = torch.get_num_threads()
    logs = []
    choice = {"threads": 2, "seconds_per_step": {1: 0.001, 2: 0.0005}, "estimate_s": 1.0}
    with _TrainingThreads(choice, logs.append) as pool:
        assert torch.get_num_threads() == 2
        pool.epoch_done(1, steps=1000)  # fast: stays on two threads
        assert torch.get_num_threads() == 2 and "fallback" not in choice
        _time.sleep(0.001 * FALLBACK_SLOWDOWN * 4)
        pool.epoch_done(2, steps=2)  # 3 ms a step against 1 ms on one thread
        assert torch.get_num_threads() == 1
    assert choice["fallback"]["after_epoch"] == 2 and choice["fallback"]["threads"] == 1
    assert logs and "one thread from here on" in logs[0]
    assert torch.get_num_threads() == before


def test_default_schedules_cost_seconds_not_hours_on_1000_images():
    """Issue 24's time bar, held by the matrix-product count (no timing, so it holds on a busy box):
    the default TSP and TEMI fits on 1,000 embeddings of 384 dims stay under 1 TFLOP each, ~20 s at
    the 50 GFLOP/s one core of the 2-core EPYC's sgemm ran (measured/GEMM ratio 2.5-3.2 in
    bench/bench_heads.py: under a minute). The poster's 50 TEMI heads of 512 for 2,000 steps were 170 TFLOP."""
    from itae_export.cluster.heads import tsp_step_flops

    n, dim, k = 1000, 384, 10
    tsp = schedule(n, TSP_DEFAULTS["batch_size"], None, TSP_DEFAULTS["min_epochs"], TSP_DEFAULTS["min_steps"])
    temi = schedule(n, TEMI_DEFAULTS["batch_size"], None, TEMI_DEFAULTS["min_epochs"], TEMI_DEFAULTS["min_steps"])
    # TSP: at most every row is distinct in a step (batch and neighbours)
    tsp_flops = tsp["steps"] * tsp_step_flops(n, dim, k, TSP_DEFAULTS["n_heads"])
    temi_flops = temi["steps"] * temi_step_flops(2 * TEMI_DEFAULTS["batch_size"], dim, k, TEMI_DEFAULTS["n_heads"],
                                                 TEMI_DEFAULTS["hidden_dim"])
    assert tsp_flops < 1e12 and temi_flops < 1e12, (tsp_flops, temi_flops)
    assert 2000 * temi_step_flops(512, dim, k, 50, 512) > 100e12  # what the bar rules out

"""Search sessions: a query, the judgments so far and the rounds shown, saved as JSON (atomically)
so that a search resumes where it stopped; feedback files in and ranked lists out."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from itae_export.data.outputs import csv_text, parse_csv
from itae_export.errors import InputError
from itae_export.files import atomic_write_bytes, atomic_write_json
from itae_export.search.feedback import METHODS, FeedbackParams, rank
from itae_export.search.index import SearchIndex

SESSION_SCHEMA = 1
RELEVANT = ("relevant", "1", "+", "yes", "true", "+1")
IRRELEVANT = ("irrelevant", "0", "-", "no", "false", "-1")


@dataclass
class Session:
    """One user's search over one collection."""

    collection: str  # the itae-cluster output folder
    model_id: str
    query: dict  # {"kind": "image" | "like" | "text", "value": ...}
    vector: list[float]  # the query's unit vector (a resumed search needs no model)
    method: str = "knn"
    k: int = 20
    judgments: dict[str, bool] = field(default_factory=dict)  # relative path -> relevant
    rounds: list[dict] = field(default_factory=list)  # {"shown": [paths], "judged": {path: bool}}
    schema: int = SESSION_SCHEMA

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or self.method not in METHODS:
            raise InputError(f"--method: {self.method!r} is not one of {', '.join(METHODS)}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InputError(f"-k: {self.k!r} must be an integer >= 1")
        if not isinstance(self.collection, str) or not isinstance(self.model_id, str):
            raise InputError("the session's collection and model_id must be texts")
        if not isinstance(self.query, dict) or not isinstance(self.query.get("kind"), str) \
                or not isinstance(self.query.get("value"), str):
            raise InputError("the session's query must be an object {kind, value}")
        if not isinstance(self.judgments, dict) or not all(isinstance(p, str) and isinstance(v, bool)
                                                           for p, v in self.judgments.items()):
            raise InputError("the session's judgments must be an object {path: true|false}")
        if not isinstance(self.rounds, list) or not all(isinstance(r, dict) for r in self.rounds):
            raise InputError("the session's rounds must be a list of objects")
        self.vector = check_vector(self.vector, "the session's query vector")

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_json(path, asdict(self))

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Session":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InputError(f"--session: {path}: no such file") from None
        except json.JSONDecodeError as e:
            raise InputError(f"--session: {path}: not valid JSON ({e})") from None
        if not isinstance(data, dict) or data.get("schema") != SESSION_SCHEMA:
            raise InputError(f"--session: {path}: not an itae-search session (schema {SESSION_SCHEMA})")
        try:
            return cls(**data)
        except TypeError as e:
            raise InputError(f"--session: {path}: bad session file ({e})") from None
        except InputError as e:
            raise InputError(f"--session: {path}: {e}") from None

    def check(self, index: SearchIndex) -> None:
        index.check_model(self.model_id, "this session's query")
        if len(self.vector) != index.dim:
            raise InputError(f"the session's query vector has dimension {len(self.vector)}, the index {index.dim}")
        unknown = [p for p in self.judgments if p not in set(index.paths)]
        if unknown:
            raise InputError(f"{len(unknown)} judged images are not in the index (e.g. {unknown[0]})")

    def judge(self, index: SearchIndex, marks: dict[str, bool]) -> None:
        """Record judgments (relative paths); a later mark of the same image replaces the earlier."""
        for p in marks:
            index.row(p)  # raises for a path outside the index
        self.judgments.update({p: bool(v) for p, v in marks.items()})
        if self.rounds:
            self.rounds[-1].setdefault("judged", {}).update({p: bool(v) for p, v in marks.items()})

    def results(self, index: SearchIndex, params: FeedbackParams | None = None, record: bool = True) -> list[tuple[str, float]]:
        """The next page: the best ``k`` images not judged yet (nor the query image itself), after all
        the feedback so far."""
        judged = {index.row(p): rel for p, rel in self.judgments.items()}
        itself = {index.row(self.query["value"])} if self.query.get("kind") == "like" else set()
        ids, scores = rank(index, np.asarray(self.vector, np.float32), judged, self.k, self.method, params, itself)
        out = [(index.paths[i], float(s)) for i, s in zip(ids, scores)]
        if record:
            self.rounds.append({"method": self.method, "shown": [p for p, _ in out], "judged": {}})
        return out


def check_vector(vector, what: str) -> list[float]:
    """``vector`` as a list of finite floats with a non-zero norm (a query direction); InputError
    in one line naming ``what`` otherwise."""
    if not isinstance(vector, (list, tuple, np.ndarray)) or len(vector) == 0:
        raise InputError(f"{what} must be a non-empty list of numbers")
    if not all(isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, (bool, np.bool_))
               for x in vector):
        raise InputError(f"{what} must hold only numbers")
    v = np.asarray(vector, np.float64)
    if not np.isfinite(v).all():
        raise InputError(f"{what} holds values that are not finite (NaN or inf)")
    if not np.any(v):
        raise InputError(f"{what} is zero: it points nowhere")
    return [float(x) for x in v]


def new_session(index: SearchIndex, out_dir, query: dict, vector: np.ndarray, model_id: str, *, method: str = "knn",
                k: int = 20) -> Session:
    index.check_model(model_id)
    v = np.asarray(check_vector(np.asarray(vector).reshape(-1), "the query's vector"), np.float64)
    v = (v / np.linalg.norm(v)).astype(np.float32)
    return Session(str(Path(out_dir).resolve()), model_id, query, v.tolist(), method, k)


def read_feedback(path: str | os.PathLike) -> dict[str, bool]:
    """{relative path: relevant} from a feedback file.

    CSV with a header ``path,label`` (label: relevant/irrelevant, 1/0, +/-, yes/no), or JSON:
    ``{"relevant": [paths], "irrelevant": [paths]}`` or ``{path: label}``."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")  # no newline translation: a "\r" inside a name stays
    except FileNotFoundError:
        raise InputError(f"--feedback: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--feedback: {path}: cannot be read ({e})") from None
    marks: dict[str, bool] = {}
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"--feedback: {path}: not valid JSON ({e})") from None
        if isinstance(data, dict) and set(data) <= {"relevant", "irrelevant"}:
            for key in ("relevant", "irrelevant"):
                items = data.get(key, [])
                if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
                    raise InputError(f"--feedback: {path}: '{key}' must be a list of paths")
                marks.update({p: key == "relevant" for p in items})
            return marks
        if not isinstance(data, dict):
            raise InputError(f"--feedback: {path}: expected an object")
        items = data.items()
    else:
        rows = parse_csv(text, f"--feedback: {path}")
        if rows and not {"path", "label"} <= set(rows[0]):
            raise InputError(f"--feedback: {path}: the CSV needs the columns path,label")
        items = [(r["path"], r["label"]) for r in rows]
    for p, label in items:
        v = str(label).strip().lower()
        if v in RELEVANT:
            marks[p] = True
        elif v in IRRELEVANT:
            marks[p] = False
        else:
            raise InputError(f"--feedback: {path}: label {label!r} of {p} is not relevant/irrelevant (or 1/0)")
    return marks


def write_ranked(results: list[tuple[str, float]], path: str | os.PathLike | None, fmt: str, root: Path | None = None) -> str:
    """The ranked list as CSV (rank,path,score) or JSON; written atomically to ``path`` when given."""
    if fmt not in ("csv", "json"):
        raise InputError(f"--format: {fmt!r} is not csv or json")
    if fmt == "json":
        text = json.dumps({"root": str(root) if root else None,
                           "results": [{"rank": i + 1, "path": p, "score": round(s, 6)} for i, (p, s) in enumerate(results)]},
                          indent=2) + "\n"
    else:
        text = csv_text(["rank", "path", "score"], ((i + 1, p, f"{s:.6f}") for i, (p, s) in enumerate(results)))
    if path is not None:
        atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))  # file names are bytes
    return text

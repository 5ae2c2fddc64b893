// How many tokens ITAE flagged in the page's images, and the sanity rule on that share: the
// browser's copy of itae_export/cluster/artifacts.py (format_stats, sanity_warning). The same
// numbers and the same threshold; tests/test_js_port.py runs both on the same masks.

// Artifacts are a few high-norm tokens per image (about 2% in Darcet et al.); above this share of
// the candidate tokens (registers and patches) the flagged tokens are ordinary patches.
// Equal to itae_export.cluster.artifacts.WARN_SHARE (a test holds them equal).
export const WARN_SHARE = 0.05;

function median(sorted) {
  const n = sorted.length, h = Math.floor(n / 2);
  return n % 2 ? sorted[h] : (sorted[h - 1] + sorted[h]) / 2;
}

// masks: one boolean array per image (the graph's artifact_mask row, length num_tokens - 1).
// Returns { images, candidates, mean, median, max, withAny, share, line, warning } where
// warning is null unless share > WARN_SHARE.
export function artifactSummary(masks, theta) {
  const counts = masks.map((m) => m.reduce((s, f) => s + (f ? 1 : 0), 0));
  const n = counts.length, candidates = n ? masks[0].length : 0;
  const total = counts.reduce((a, b) => a + b, 0);
  const sorted = [...counts].sort((a, b) => a - b);
  const s = {
    images: n, candidates, tokens: total,
    mean: n ? total / n : 0, median: n ? median(sorted) : 0, max: n ? sorted[n - 1] : 0,
    withAny: counts.filter((c) => c > 0).length,
    share: n && candidates ? total / (n * candidates) : 0,
  };
  const at = theta == null ? "" : ` at theta ${Number(Number(theta).toPrecision(6))}`;  // Python's format(theta, "g")
  s.line = `Artifacts${at}: ${s.mean.toFixed(2)} flagged tokens per image (median ${s.median}, max ${s.max}) ` +
    `of ${candidates}; ${s.withAny} of ${n} images with any; ${(100 * s.share).toFixed(2)}% of the candidate tokens`;
  s.warning = s.share > WARN_SHARE
    ? `warning: ITAE flagged ${(100 * s.share).toFixed(1)}% of the candidate tokens${at} (mean ${s.mean.toFixed(1)} ` +
      `of ${candidates} per image, in ${s.withAny} of ${n} images); artifacts are a few tokens per image ` +
      `(above ${100 * WARN_SHARE}% these are ordinary patches, and the overlay marks them all): run itae-inspect ` +
      `to choose a theta, or export with --no-itae`
    : null;
  return s;
}

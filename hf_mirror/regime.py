"""Whether a run's mirrors stayed in the regime where their loss deltas mean something, measured after the scan.

Two checks, each per probe, each naming the flag that brings the run back:

- **Probe-loss rise.** How far the mirror moved its own probe's loss (``probe_loss_after - probe_loss_before``, signed
  so that unlearning is positive). The gradient mirror (``fit="gradient"``) is written to raise it by ``step_rise``
  nats to first order, so its measured rise should be within a small factor of that; the step-fitted mirror
  (``fit="steps"``) raised it by 7-47 nats on average on the models its defaults were chosen on
  (docs/benchmarks_lds_real_text.md, docs/method.md). A mirror far outside is not the perturbation its scores were
  calibrated for.
- **Common drift.** When the median document's delta is large next to the spread of the deltas between documents
  (interquartile range), most of what every document shows is the drift any perturbation of that size causes, not
  what sets one document apart from another.

The thresholds come from measurements on the test and demo models (docs/method.md, "When a run says its mirrors
left the regime").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

# the gradient mirror's measured rise over its first-order target: 1.1-1.8 at --step-rise 0.01 on the test and demo
# models (plain and RMS-preconditioned), 1.6-12.8 at 1 nat, 0.4-0.6 at 10 (saturated); the default (RMS, with the
# output layer and the embedding tables) 1.0-1.3 on the capitals benchmark model, up to 30 on WordNet and 27 on the
# docstrings (a few rare tokens' embedding rows), where its tail-patch and LDS are the best measured; at --step-rise
# 0.03 those rise 14-73x (0.4-2.2 nats) and the tail-patch falls, at 0.1 50-120x and it collapses
# (docs/method.md, docs/benchmarks_tail_patch.md). Below a third of the target the loss has saturated; above 50x the
# step is far from first order
BELOW_FACTOR = 3.0
ABOVE_FACTOR = 50.0
# the step-fitted mirror (8 Adam steps, lr 5e-3): its mean rise was 7.2 and 9.0 nats on the LDS benchmark's GPT-2s,
# 16-22 on the demo model and 46.7 on SmolLM2 fine-tuned on facts (25-62 per probe, still MRR 0.96); a rise past every
# benchmark model's mean is far outside what it was calibrated on (docs/method.md)
RISE_LIMIT = 50.0
# |median delta| / interquartile range of the deltas: at most 0.18 for the default gradient mirror on the test model,
# 4.5-30 for mirrors pushed 10 nats or more (docs/method.md)
DRIFT_LIMIT = 3.0


def probe_stats(records: Sequence[Mapping], raw: Mapping[str, np.ndarray], direction: str) -> dict[str, dict]:
    """Per probe: the probe-loss rise and the median and interquartile range of its documents' raw deltas."""
    sign = -1.0 if direction == "learn" else 1.0
    out = {}
    for r in records:
        before, after = r.get("probe_loss_before"), r.get("probe_loss_after")
        rise = sign * (after - before) if isinstance(before, (int, float)) and isinstance(after, (int, float)) \
            else None
        x = np.asarray(raw.get(str(r["id"]), ()), np.float64)
        x = x[np.isfinite(x)]
        median = iqr = None
        if len(x):
            q1, median, q3 = (float(v) for v in np.percentile(x, [25, 50, 75]))
            iqr = q3 - q1
        out[str(r["id"])] = {"rise": rise, "median": median, "iqr": iqr}
    return out


def _shown(ids: list[str]) -> str:
    return ", ".join(repr(i) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def warnings_for(stats: Mapping[str, Mapping], mirror: Mapping, read: str = "forward") -> list[str]:
    """The run's warnings, one sentence each naming the probes and the flag to change (empty: in the regime).
    ``read``: how the scan read the mirrors (under ``linear`` the scores are first order whatever the step, and only
    the listed documents' token deltas, read by forward passes, leave the regime)."""
    gradient = mirror.get("fit", "gradient") == "gradient"
    step_rise = float(mirror.get("step_rise", 0.01))
    out = []
    rises = {p: s["rise"] for p, s in stats.items() if s.get("rise") is not None}
    if gradient:
        far = [p for p, r in rises.items() if not step_rise / BELOW_FACTOR <= r <= ABOVE_FACTOR * step_rise]
        if far:
            lo, hi = min(rises[p] for p in far), max(rises[p] for p in far)
            out.append(f"The gradient mirror moved the probe loss by {lo:.3g} to {hi:.3g} nats for {_shown(far)}, "
                       f"outside {1 / BELOW_FACTOR:.2g}-{ABOVE_FACTOR:g}x its first-order target (--step-rise "
                       f"{step_rise:g}): the "
                       + ("step is no longer first order, so the deltas are not the influence estimate; lower "
                          "--step-rise (default 0.01)." if read != "linear" else
                          "step is no longer first order: the scores (the linear read) still are, but the listed "
                          "documents' token deltas (forward passes under the mirror) are not; lower --step-rise "
                          "(default 0.01) for token deltas that add up to the scores."))
    else:
        far = [p for p, r in rises.items() if r > RISE_LIMIT]
        if far:
            worst = max(rises[p] for p in far)
            out.append(f"The step-fitted mirrors raised the probe loss by up to {worst:.3g} nats for {_shown(far)}, "
                       f"beyond {RISE_LIMIT:g} nats, past the mean rise of every model the step fit was calibrated "
                       "on (7-47 nats): lower --steps or --lr, cap the rise with --target-rise, or use the gradient "
                       "mirror (--fit gradient, the default).")
    drift = {p: s for p, s in stats.items() if s.get("median") is not None and s.get("iqr") is not None
             and abs(s["median"]) > DRIFT_LIMIT * s["iqr"]}
    if drift:
        ratio = max(abs(s["median"]) / s["iqr"] if s["iqr"] > 0 else float("inf") for s in drift.values())
        knob = "lower --step-rise" if gradient else "lower --steps or --lr (or set --target-rise)"
        out.append(f"Common drift dominates the document deltas of {_shown(list(drift))}: the median document moved "
                   f"{ratio:.3g}x the spread between documents (interquartile range), so a document's score mostly "
                   f"says how much every document moved; {knob}, or remove the drift with --normalize zscore.")
    return out

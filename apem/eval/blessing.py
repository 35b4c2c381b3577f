"""The blessing rule: when may a freshly trained candidate replace the serving champion?

Default rule (every threshold is a field of :class:`BlessingRule`, and a pipeline parameter):

With a champion, both scored on the same test split, the candidate is blessed when
  1. no task is significantly worse: for every funnel step, DeLong's paired test of
     H1: AUC_candidate < AUC_champion has p >= alpha (one-sided by default, since only a
     degradation blocks a push; ``two_sided=True`` uses the two-sided p-value and still counts only
     a negative delta as "worse"), and
  2. the primary task (the deepest funnel step unless named) is not worse by point estimate:
     AUC_candidate - AUC_champion >= -primary_tolerance (tolerance 0 by default).

Without a champion (the first run), the candidate is blessed when it beats chance on every task:
AUC > 0.5 + chance_margin and DeLong's one-sided test of H1: AUC > 0.5 has p < alpha.

A task whose AUC cannot be computed (one class absent in the test split) blocks the blessing with
that reason: we never promote a model on evidence we could not collect.

``test="bootstrap"`` makes the paired bootstrap (normal approximation with its standard error)
the deciding test instead of DeLong; both are always reported.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

TESTS = ("delong", "bootstrap")


@dataclass(frozen=True)
class BlessingRule:
    alpha: float = 0.05
    two_sided: bool = False
    primary_task: str = ""          # empty: the deepest funnel step
    primary_tolerance: float = 0.0  # allowed AUC drop of the primary task by point estimate
    chance_margin: float = 0.0      # first model: AUC must exceed 0.5 + margin on every task
    test: str = "delong"

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha < 1.0:
            raise ValueError(f"blessing rule: alpha must be in (0, 1), got {self.alpha}")
        if self.test not in TESTS:
            raise ValueError(f"blessing rule: test must be one of {TESTS}, got {self.test!r}")
        if self.primary_tolerance < 0 or not 0.0 <= self.chance_margin < 0.5:
            raise ValueError("blessing rule: primary_tolerance must be >= 0 and chance_margin in [0, 0.5)")

    @classmethod
    def from_dict(cls, raw: dict | None) -> "BlessingRule":
        raw = dict(raw or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"blessing rule: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**raw)

    def to_dict(self) -> dict:
        return asdict(self)

    def primary(self, labels: list[str] | tuple[str, ...]) -> str:
        if not self.primary_task:
            return labels[-1]
        if self.primary_task not in labels:
            raise ValueError(f"blessing rule: primary_task {self.primary_task!r} is not one of {list(labels)}")
        return self.primary_task

    def describe(self) -> str:
        sided = "two-sided" if self.two_sided else "one-sided"
        return (
            f"no task significantly worse ({self.test}, {sided}, alpha={self.alpha}); primary task "
            f"not worse by point estimate (tolerance {self.primary_tolerance}); first model must beat "
            f"chance (AUC > 0.5 + {self.chance_margin}, one-sided p < {self.alpha}) on every task"
        )


@dataclass
class Decision:
    blessed: bool
    has_champion: bool
    reasons: list[str] = field(default_factory=list)
    rule: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(*values: float) -> bool:
    return all(v is not None and math.isfinite(v) for v in values)


def decide(labels: list[str], tests: dict[str, dict], rule: BlessingRule, has_champion: bool) -> Decision:
    """Apply ``rule`` to per-task test results and say why.

    ``tests[label]`` holds the chosen test's result as a dict (see
    :class:`apem.eval.significance.PairedTest`): against the champion when ``has_champion``, against
    chance (auc_b = 0.5) otherwise. Every task contributes a reason, passing or failing.
    """
    primary = rule.primary(labels)
    blessed, reasons = True, []
    for label in labels:
        t = tests.get(label)
        if t is None or not _finite(t.get("auc_a"), t.get("auc_b"), t.get("delta")):
            blessed = False
            reasons.append(f"{label}: AUC could not be computed on the test split (one class absent)")
            continue
        p_worse = t["p_two_sided"] if rule.two_sided else t["p_worse"]
        if has_champion:
            significantly_worse = t["delta"] < 0 and p_worse < rule.alpha
            verdict = "significantly worse" if significantly_worse else "not significantly worse"
            reasons.append(
                f"{label}: {verdict} (AUC {t['auc_a']:.4f} vs champion {t['auc_b']:.4f}, "
                f"delta {t['delta']:+.4f}, p={p_worse:.3g})"
            )
            blessed &= not significantly_worse
            if label == primary:
                drop_ok = t["delta"] >= -rule.primary_tolerance
                reasons.append(
                    f"{label} (primary): {'not worse' if drop_ok else 'worse'} by point estimate "
                    f"(delta {t['delta']:+.4f}, tolerance {rule.primary_tolerance})"
                )
                blessed &= drop_ok
        else:
            beats = t["auc_a"] > 0.5 + rule.chance_margin and t["p_better"] < rule.alpha
            reasons.append(
                f"{label}: {'beats' if beats else 'does not beat'} chance (AUC {t['auc_a']:.4f}, "
                f"margin {rule.chance_margin}, p={t['p_better']:.3g})"
            )
            blessed &= beats
    if not has_champion:
        reasons.insert(0, "no champion yet: the first model must beat chance on every task")
    return Decision(blessed=bool(blessed), has_champion=has_champion, reasons=reasons, rule=rule.to_dict())

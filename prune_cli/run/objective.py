"""What a run returns to a Hydra sweeper (``hydra/sweeper=optuna``): the value the top-level ``objective`` block names.

``objective.metric`` is read off the results: the final ``top1``, its ``best_top1``, or ``top1_change`` (final minus
the dense model's). With ``objective.budget`` B, the run should remove at least the share B of ``objective.budget_of``
(the dense model's MACs or params, or its measured latency at batch 1, from the pruning stage's ``speedup_b1``);
each percentage point it falls short costs ``objective.penalty`` points:

    objective = metric - penalty * 100 * max(0, B - removed)

so a search maximising it looks for the best accuracy among the networks that meet the budget.
"""

from __future__ import annotations

import math

from prune_cli.core.errors import UserError
from prune_cli.core.options import Choice, Float, Section
from prune_cli.stages.base import STAGES, dense_and_final

OPTION = Section(
    "objective",
    (
        Choice("metric", "top1", ("top1", "best_top1", "top1_change"), "the value a run returns to a sweeper"),
        Float(
            "budget",
            None,
            "the share of budget_of the run should remove; each point short costs penalty points (null: no budget)",
            lo=0.0,
            hi=1.0,
            lo_open=True,
            hi_open=True,
            nullable=True,
        ),
        Choice(
            "budget_of", "macs", ("macs", "params", "latency"), "what the budget is a share of (latency: at batch 1)"
        ),
        Float("penalty", 10.0, "points of the metric per percentage point of the budget missed", lo=0.0),
    ),
    "what a run returns to a Hydra sweeper (hydra/sweeper=optuna): metric - penalty * points of budget missed",
    absent={"metric": "top1", "budget": None, "budget_of": "macs", "penalty": 10.0},
)


def check_config(cfg: dict) -> None:
    """What the objective reads must exist: a dense model to compare with (a pruning stage, or a pruned init_from)
    for ``top1_change`` and budgets, and the run's timing (``latency: on``) for a latency budget."""
    o = cfg["objective"]
    compares = o["metric"] == "top1_change" or o["budget"] is not None
    if compares and cfg["init_from"] is None and not any(STAGES.get(s).prunes for s in cfg["schedule"]["stages"]):
        option = "objective.metric" if o["budget"] is None else "objective.budget"
        raise UserError(option, "compares the pruned model with the dense one, and no stage of the schedule prunes")
    if o["budget"] is not None and o["budget_of"] == "latency" and cfg["latency"] in ("off", False):
        raise UserError("objective.budget_of", "latency is measured only with latency=on; set it, or budget macs")


def removed(dense: dict, final: dict, rows: list[dict], of: str) -> float:
    """The share of ``of`` the run removed: of the dense model's MACs or params, or of its latency at batch 1."""
    if of != "latency":
        return 1 - final[of] / dense[of]
    speedups = [r["speedup_b1"] for r in rows if not math.isnan(r.get("speedup_b1", math.nan))]
    if not speedups:
        raise UserError("objective.budget_of", "the run timed no pruned model (no speedup_b1 in its results)")
    return 1 - 1 / speedups[-1]


def value(rows: list[dict], objective) -> float:
    """The objective of a finished run's results ``rows`` (NaN when it compares with a dense model the rows lack:
    a run started from a checkpoint that was not pruned)."""
    pair, final = dense_and_final(rows), rows[-1]
    if pair is None and (objective.metric == "top1_change" or objective.budget is not None):
        return math.nan
    metric = final["top1"] - pair[0]["top1"] if objective.metric == "top1_change" else final[objective.metric]
    if objective.budget is None:
        return float(metric)
    miss = max(0.0, objective.budget - removed(*pair, rows, objective.budget_of))
    return float(metric - objective.penalty * 100 * miss)

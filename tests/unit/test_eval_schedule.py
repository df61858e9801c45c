"""When training stops for a held-out evaluation (`eval.eval_steps`, `eval.eval_every_s`)."""

from spo_cli.recipe import Eval
from spo_cli.train import _eval_due


def test_eval_every_s_evaluates_when_the_iterations_time_passes_a_multiple():
    spec = Eval(eval_every_s=10.0)
    # Iteration time went 8 -> 12 s: the 10 s mark was passed.
    assert _eval_due(spec, 3, 8.0, 12.0)
    # 12 -> 19.9 s passes no multiple of 10; 19.9 -> 20.0 reaches one.
    assert not _eval_due(spec, 4, 12.0, 19.9)
    assert _eval_due(spec, 5, 19.9, 20.0)
    # One slow iteration passing two marks evaluates once (the call says yes, it cannot say twice).
    assert _eval_due(spec, 6, 20.5, 41.0)
    # eval_steps still counts on its own; with neither set nothing is due.
    assert _eval_due(Eval(eval_steps=2, eval_every_s=100.0), 4, 1.0, 2.0)
    assert not _eval_due(Eval(eval_steps=2, eval_every_s=100.0), 3, 1.0, 2.0)
    assert not _eval_due(Eval(), 7, 0.0, 1e9)

"""Weight quantisation as ai-toolkit applies it for ``model.quantize`` / ``quantize_te`` (optimum-quanto)."""

from __future__ import annotations


class QuantizeError(Exception):
    """Quantisation cannot be reproduced here. ``missing_package`` marks an environment problem."""

    def __init__(self, problem: str, missing_package: bool = False):
        self.problem = problem
        self.missing_package = missing_package
        super().__init__(problem)


def quantize_module(module, qtype: str, what: str) -> None:
    """Quantise ``module``'s weights in place with optimum-quanto and freeze them, as ai-toolkit does."""
    try:
        from optimum import quanto
    except ImportError:
        raise QuantizeError(
            f"the job quantised its {what} ({qtype}); install optimum-quanto to replay it: pip install optimum-quanto",
            missing_package=True,
        ) from None
    try:
        weights = getattr(quanto, qtype)
    except AttributeError:
        raise QuantizeError(f"unsupported quantisation type {qtype!r} for the {what}") from None
    quanto.quantize(module, weights=weights)
    quanto.freeze(module)

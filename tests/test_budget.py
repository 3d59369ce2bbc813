import pytest

from vtc.methods import Budget, VTCError


@pytest.mark.parametrize(
    "given,kind,value",
    [(64, "count", 64), ("64", "count", 64), (0.111, "ratio", 0.111), ("0.25", "ratio", 0.25),
     ("25%", "ratio", 0.25), ("auto", "auto", None), (" AUTO ", "auto", None), (1.0, "ratio", 1.0)],
)
def test_parse_forms(given, kind, value):
    budget = Budget.parse(given)
    assert budget.kind == kind
    assert budget.value == value


@pytest.mark.parametrize("bad", [0, -3, 0.0, 1.5, float("nan"), "", "many", None, True, "-2"])
def test_parse_refuses_bad_budgets(bad):
    with pytest.raises(VTCError, match="budget"):
        Budget.parse(bad)


def test_tokens_for_each_form():
    assert Budget.parse(64).tokens(576) == 64
    assert Budget.parse(0.111).tokens(576) == round(0.111 * 576) == 64
    assert Budget.parse(0.0001).tokens(576) == 1  # never zero tokens
    with pytest.raises(VTCError, match="more than the image's 576"):
        Budget.parse(577).tokens(576)
    with pytest.raises(VTCError, match="auto"):
        Budget.parse("auto").tokens(576)

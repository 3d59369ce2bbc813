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


# ----------------------------------------------------------------------------- budget strings, worked by hand
# How a string is written decides its kind: digits only is a count, a decimal point or an exponent a ratio.
# Expected token counts on LLaVA-1.5's N = 576 patches, worked out by hand (ratio r -> round(r * 576)).


@pytest.mark.parametrize(
    "text,kind,tokens_of_576",
    [
        ("1.0", "ratio", 576),  # all tokens, never one token
        ("1.", "ratio", 576),
        ("1e0", "ratio", 576),  # an exponent is float notation: the ratio 1
        ("1", "count", 1),
        ("0.5", "ratio", 288),
        (".5", "ratio", 288),
        ("1e-1", "ratio", 58),  # 57.6
        ("2.5E-2", "ratio", 14),  # 14.4
        ("0.111", "ratio", 64),  # 63.936
        ("64", "count", 64),
        (" 64 ", "count", 64),
        ("+64", "count", 64),
        ("\t128\n", "count", 128),
        ("11%", "ratio", 63),  # 63.36
        ("12.5 %", "ratio", 72),
        ("100%", "ratio", 576),
        ("1e-05", "ratio", 1),  # str() of a tiny ratio reads back as that ratio; never zero tokens
    ],
)
def test_budget_strings_by_hand(text, kind, tokens_of_576):
    budget = Budget.parse(text)
    assert budget.kind == kind
    assert budget.tokens(576) == tokens_of_576


@pytest.mark.parametrize("text,count", [("1e2", 100), ("5e1", 50), ("64.0", 64), ("2.", 2), ("1E3", 1000)])
def test_decimals_and_exponents_above_one_are_refused_with_the_count_to_write(text, count):
    with pytest.raises(VTCError, match=rf"budget '{text}' reads as the ratio .*write {count} for a token count"):
        Budget.parse(text)


@pytest.mark.parametrize(
    "bad",
    ["", "   ", "%", "many", "64 tokens", "inf", "-inf", "nan", "1_000", "0x40", "1,5", "1e", "e5", "--2",
     "0", "-2", "-0.5", "0.0", "0%", "1e-400", "1.5", "150%", "200%", "auto>64", "\u0666\u0664"],
)
def test_bad_budget_strings_get_a_clear_error(bad):
    with pytest.raises(VTCError, match="budget") as err:
        Budget.parse(bad)
    assert "write" not in str(err.value) or "%" not in bad  # a percentage above 100 suggests no count


@pytest.mark.parametrize("given", [1, 64, 576, 1.0, 0.5, 0.111, 1e-05, 0.1 + 0.2, 2.5e-7, "auto", "11%"])
def test_str_of_a_budget_parses_back_to_the_same_budget(given):
    budget = Budget.parse(given)
    assert Budget.parse(str(budget)) == budget


def test_the_cli_spec_reads_budget_strings_the_same_way():
    from vtc.pipeline import resolve

    _, budget, _, _ = resolve("fastervlm", "1.0", {})
    assert budget.tokens(576) == 576
    _, vision, _, llm = resolve("fastervlm>fastv", "0.5>1e-1", {})
    assert (vision.tokens(576), llm.tokens(576)) == (288, 58)
    with pytest.raises(VTCError, match="write 100"):
        resolve("fastervlm", "1e2", {})


def test_numpy_numbers_are_budgets_like_pythons():
    """A budget taken from an array (np.int64 from arange, np.float32 from a linspace) means what the
    same Python number means: a numpy int is a count, a numpy float a ratio, with the same refusals."""
    import numpy as np

    for given, expected in ((np.int64(64), Budget("count", 64)), (np.int32(1), Budget("count", 1)),
                            (np.float32(0.25), Budget("ratio", 0.25)), (np.float64(1.0), Budget("ratio", 1.0))):
        budget = Budget.parse(given)
        assert budget == expected and type(budget.value) is type(expected.value)
    for bad in (np.int64(0), np.float32(1.5), np.float64("nan"), np.bool_(True)):
        with pytest.raises(VTCError, match="budget"):
            Budget.parse(bad)


@pytest.mark.parametrize("text", ["64.5", "1.5", "0.0", "0e0", "-3.0"])
def test_ratios_that_are_no_whole_count_above_one_suggest_no_count(text):
    """Only a whole number above 1 written as a decimal gets "write N"; 64.5 and 0.0 name the ratio rule alone."""
    with pytest.raises(VTCError) as err:
        Budget.parse(text)
    message = str(err.value)
    assert "write" not in message and message.endswith("a ratio must be in (0, 1]") or "expected a token count" in message

"""The `herd` parser alone (no model): where options and positionals may go."""

import pytest

from llamaherd.cli import build_parser


@pytest.mark.parametrize("argv", [
    ["run", "smollm2", "--temperature", "0", "--seed", "3", "Hi there"],
    ["run", "--temperature", "0", "smollm2", "Hi there", "--seed", "3"],
    ["run", "smollm2", "Hi there", "--temperature", "0", "--seed", "3"],
])
def test_run_takes_options_before_between_or_after_the_positionals(argv):
    args = build_parser().parse_args(argv)
    assert (args.model, args.prompt, args.temperature, args.seed) == ("smollm2", "Hi there", 0.0, 3)


def test_verbs_with_verbs_of_their_own_still_parse():
    args = build_parser().parse_args(["train", "sft", "--model", "m", "--data", "d.jsonl", "--out", "o"])
    assert (args.verb, args.model, args.data) == ("sft", "m", "d.jsonl")


def test_a_second_prompt_is_still_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["run", "smollm2", "one", "--seed", "1", "two"])
    assert e.value.code == 2 and "unrecognized arguments: two" in capsys.readouterr().err

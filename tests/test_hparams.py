"""Tests for lm_human_preferences.hparams."""

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from lm_human_preferences.hparams import HParams, HParamsError, check_count


@dataclass
class AdaptiveKLParams(HParams):
    target: float = 6.0
    horizon: int = 10000

    def _validate(self):
        if self.horizon <= 0:
            raise HParamsError("must be > 0", key="horizon")


@dataclass
class RewardsParams(HParams):
    kl_coef: float = 0.2
    adaptive_kl: Optional[AdaptiveKLParams] = None
    whiten: bool = True


@dataclass
class PPOParams(HParams):
    lr: float = 5e-6
    total_episodes: int = 2000000
    nminibatches: int = 1
    noptepochs: int = 4
    cliprange: Optional[float] = 0.2
    seed: int | None = None


@dataclass
class TaskParams(HParams):
    query_length: int = 64
    start_text: Optional[str] = "."
    end_text: str = ""
    policy_init: str = "124M"
    truncate_token: Optional[int] = None
    penalty_reward_value: float = -1.0
    sampler: Literal["greedy", "sample"] = "sample"
    devices: tuple[int, ...] = (0,)
    tags: list[str] = field(default_factory=list)
    shape: tuple[int, int] = (2, 3)


@dataclass
class TrainParams(HParams):
    task: TaskParams = field(default_factory=TaskParams)
    rewards: RewardsParams = field(default_factory=RewardsParams)
    ppo: PPOParams = field(default_factory=PPOParams)
    run_name: str = "run"
    debug: bool = False

    def _validate(self):
        if self.ppo.total_episodes % self.ppo.nminibatches:
            raise HParamsError("must divide ppo.total_episodes", key="ppo.nminibatches")


def test_defaults_and_flat_items():
    hp = TrainParams()
    flat = hp.flat_items()
    assert flat["ppo.lr"] == 5e-6
    assert flat["rewards.adaptive_kl"] is None
    assert "rewards.adaptive_kl.target" not in flat
    assert flat["task.devices"] == (0,)
    assert flat["run_name"] == "run"


def test_override_every_type():
    hp = TrainParams()
    hp.override_from_pair("ppo.lr", "1e-5")
    hp.override_from_pair("ppo.total_episodes", "1e6")
    hp.override_from_pair("ppo.noptepochs", "8")
    hp.override_from_pair("ppo.cliprange", "none")
    hp.override_from_pair("ppo.seed", "3")
    hp.override_from_pair("rewards.whiten", "False")
    hp.override_from_pair("debug", "YES")
    hp.override_from_pair("task.policy_init", "774M")
    hp.override_from_pair("task.sampler", "greedy")
    hp.override_from_pair("task.truncate_token", "13")
    hp.override_from_pair("task.penalty_reward_value", "-2")
    hp.override_from_pair("task.devices", "0, 1,2")
    hp.override_from_pair("task.tags", "a,b")
    hp.override_from_pair("task.shape", "4,5")
    assert hp.ppo.lr == 1e-5 and isinstance(hp.ppo.lr, float)
    assert hp.ppo.total_episodes == 1000000 and type(hp.ppo.total_episodes) is int
    assert hp.ppo.noptepochs == 8
    assert hp.ppo.cliprange is None
    assert hp.ppo.seed == 3
    assert hp.rewards.whiten is False
    assert hp.debug is True
    assert hp.task.policy_init == "774M"
    assert hp.task.sampler == "greedy"
    assert hp.task.truncate_token == 13
    assert hp.task.penalty_reward_value == -2.0 and isinstance(hp.task.penalty_reward_value, float)
    assert hp.task.devices == (0, 1, 2)
    assert hp.task.tags == ["a", "b"]
    assert hp.task.shape == (4, 5)
    hp.validate()


@pytest.mark.parametrize("text", ["1000000", "1e6", "1E6", "1_000_000", "1000000.0"])
def test_int_from_float_notation(text):
    hp = PPOParams()
    hp.override_from_pair("total_episodes", text)
    assert hp.total_episodes == 1000000 and type(hp.total_episodes) is int


@pytest.mark.parametrize("text,expected", [
    ("true", True), ("1", True), ("yes", True), ("ON", True), ("True", True),
    ("false", False), ("0", False), ("no", False), ("Off", False), ("FALSE", False),
])
def test_bool_spellings(text, expected):
    hp = RewardsParams(whiten=not expected)
    hp.override_from_pair("whiten", text)
    assert hp.whiten is expected


def test_optional_none_spellings():
    for text in ["", "none", "None", "null"]:
        hp = PPOParams(seed=1)
        hp.override_from_pair("seed", text)
        assert hp.seed is None


def test_empty_string_for_str_fields():
    hp = TaskParams()
    hp.override_from_pair("start_text", "")
    assert hp.start_text == ""
    hp.override_from_pair("end_text", "")
    assert hp.end_text == ""
    hp.override_from_pair("start_text", "None")  # Optional[str]: only "None" means None
    assert hp.start_text is None
    hp.override_from_pair("start_text", "none")
    assert hp.start_text == "none"
    hp.override_from_pair("tags", "")
    assert hp.tags == []


def test_section_on_then_subkey_then_off():
    hp = TrainParams()
    hp.override_from_pair("rewards.adaptive_kl", "on")
    assert hp.rewards.adaptive_kl == AdaptiveKLParams()
    hp.override_from_pair("rewards.adaptive_kl.target", "6")
    assert hp.rewards.adaptive_kl.target == 6.0
    hp.override_from_pair("rewards.adaptive_kl.horizon", "500")
    hp.override_from_pair("rewards.adaptive_kl", "on")  # already on: kept as is
    assert hp.rewards.adaptive_kl == AdaptiveKLParams(target=6.0, horizon=500)
    hp.override_from_pair("rewards.adaptive_kl", "off")
    assert hp.rewards.adaptive_kl is None
    assert hp.flat_items()["rewards.adaptive_kl"] is None


def test_subkey_on_off_section_turns_it_on():
    hp = TrainParams()
    hp.override_from_pair("rewards.adaptive_kl.horizon", "123")
    assert hp.rewards.adaptive_kl == AdaptiveKLParams(horizon=123)


@pytest.mark.parametrize("args", [["--rewards.adaptive_kl=off", "--rewards.adaptive_kl.target=3"],
                                  ["--rewards.adaptive_kl.target", "3", "--rewards.adaptive_kl", "no"]])
def test_one_command_line_cannot_turn_a_section_off_and_set_a_key_inside_it(args):
    """Applied in turn, the later flag would silently win (off, or on again with the key): refused
    whatever the order, and nothing is applied."""
    hp = TrainParams()
    with pytest.raises(HParamsError, match=r"^--rewards\.adaptive_kl=(off|no) turns the section off, but "
                                           r"--rewards\.adaptive_kl\.target sets a key inside it; pass one or the other$"):
        hp.override_from_args(["--ppo.lr=0.5", *args])
    assert hp == TrainParams()
    hp.override_from_args(["--rewards.adaptive_kl=on", "--rewards.adaptive_kl.target=3"])  # no contradiction
    assert hp.rewards.adaptive_kl == AdaptiveKLParams(target=3.0)
    hp.override_from_args(["--rewards.adaptive_kl=off"])  # a later command line may turn it off
    assert hp.rewards.adaptive_kl is None


def test_failed_override_does_not_turn_section_on():
    hp = TrainParams()
    with pytest.raises(HParamsError):
        hp.override_from_pair("rewards.adaptive_kl.horizon", "abc")
    with pytest.raises(HParamsError):
        hp.override_from_pair("rewards.adaptive_kl.horizn", "1")
    assert hp.rewards.adaptive_kl is None


def test_section_bad_values():
    hp = TrainParams()
    with pytest.raises(HParamsError, match="rewards.adaptive_kl"):
        hp.override_from_pair("rewards.adaptive_kl", "maybe")
    with pytest.raises(HParamsError, match="cannot be turned off"):
        hp.override_from_pair("rewards", "off")
    hp.override_from_pair("rewards", "on")  # required section: no-op


def test_unknown_key_suggestions():
    hp = TrainParams()
    with pytest.raises(HParamsError) as e:
        hp.override_from_pair("ppo.lrr", "1")
    assert str(e.value) == "unknown hyperparameter 'ppo.lrr'; did you mean 'ppo.lr'?"
    # keys inside off sections are suggested too
    with pytest.raises(HParamsError, match="did you mean 'rewards.adaptive_kl.target'"):
        hp.override_from_pair("rewards.adaptive_kl.targt", "1")
    # a bare leaf name suggests its full dotted key
    with pytest.raises(HParamsError, match="did you mean 'ppo.noptepochs'"):
        hp.override_from_pair("noptepochs", "1")
    with pytest.raises(HParamsError, match=r"^unknown hyperparameter 'zzzzzz'$"):
        hp.override_from_pair("zzzzzz", "1")


def test_subkey_on_non_section():
    hp = TrainParams()
    with pytest.raises(HParamsError) as e:
        hp.override_from_pair("ppo.lr.x", "1")
    msg = str(e.value)
    assert "'ppo.lr'" in msg and "not a section" in msg and "'ppo.lr.x'" in msg


@pytest.mark.parametrize("key,value,expects", [
    ("ppo.lr", "abc", "float"),
    ("ppo.noptepochs", "1.5", "int"),
    ("ppo.noptepochs", "four", "int"),
    ("ppo.seed", "x", "int or None"),
    ("debug", "maybe", "bool"),
    ("task.sampler", "beam", "one of 'greedy', 'sample'"),
    ("task.devices", "0,a", "comma-separated list of int"),
    ("task.shape", "1,2,3", "comma-separated list of int"),
])
def test_bad_values(key, value, expects):
    hp = TrainParams()
    with pytest.raises(HParamsError) as e:
        hp.override_from_pair(key, value)
    assert str(e.value).startswith(f"hyperparameter '{key}' expects {expects}, got ")


def test_bad_value_message_exact():
    with pytest.raises(HParamsError) as e:
        TrainParams().override_from_pair("ppo.lr", "abc")
    assert str(e.value) == "hyperparameter 'ppo.lr' expects float, got 'abc'"
    assert isinstance(e.value, ValueError)


def test_override_from_dict_typed_and_strings():
    hp = TrainParams()
    hp.override_from_dict({
        "ppo.lr": 1e-4,
        "ppo.total_episodes": 1e6,
        "ppo.noptepochs": "2",
        "task.devices": [0, 1],
        "task.start_text": None,
        "rewards.adaptive_kl": {"target": 3},
        "debug": True,
    })
    assert hp.ppo.lr == 1e-4
    assert hp.ppo.total_episodes == 1000000 and type(hp.ppo.total_episodes) is int
    assert hp.ppo.noptepochs == 2
    assert hp.task.devices == (0, 1)
    assert hp.task.start_text is None
    assert hp.rewards.adaptive_kl == AdaptiveKLParams(target=3.0)
    assert hp.debug is True
    hp.override_from_dict({"rewards.adaptive_kl": False})
    assert hp.rewards.adaptive_kl is None
    hp.override_from_dict({"rewards.adaptive_kl": AdaptiveKLParams(horizon=7)})
    assert hp.rewards.adaptive_kl.horizon == 7


@pytest.mark.parametrize("d", [
    {"ppo.lr": "abc"}, {"debug": 1}, {"ppo.noptepochs": 1.5}, {"run_name": 3},
    {"ppo.lr": True}, {"task.sampler": "beam"}, {"ppo.lrr": 1}, {"ppo.lr": {"x": 1}},
])
def test_override_from_dict_errors(d):
    with pytest.raises(HParamsError):
        TrainParams().override_from_dict(d)


def test_override_from_dict_nested_dict_for_leaf_is_rejected_without_side_effects():
    hp = TrainParams()
    with pytest.raises(HParamsError, match="'run_name' is not a section"):
        hp.override_from_dict({"run_name": {"x": 1}})
    assert hp.run_name == "run"


def test_override_from_args_both_forms():
    hp = TrainParams()
    hp.override_from_args([
        "--ppo.lr=3e-5", "--ppo.noptepochs", "2", "--task.start_text=",
        "--rewards.adaptive_kl=on", "--rewards.adaptive_kl.target", "6",
        "--task.penalty_reward_value", "-3", "--run_name=a=b",
    ])
    assert hp.ppo.lr == 3e-5
    assert hp.ppo.noptepochs == 2
    assert hp.task.start_text == ""
    assert hp.rewards.adaptive_kl.target == 6.0
    assert hp.task.penalty_reward_value == -3.0
    assert hp.run_name == "a=b"


@pytest.mark.parametrize("args,match", [
    (["ppo.lr=1"], "unexpected argument"),
    (["--ppo.lr"], "missing value"),
    (["--ppo.lr", "--debug=1"], "missing value"),
    (["--"], "unexpected argument"),
    (["--ppo.lrr=1"], "did you mean 'ppo.lr'"),
])
def test_override_from_args_errors(args, match):
    with pytest.raises(HParamsError, match=match):
        TrainParams().override_from_args(args)


def test_validate_hook_names_full_key():
    hp = TrainParams()
    hp.validate()
    hp.override_from_args(["--rewards.adaptive_kl.horizon=0"])
    with pytest.raises(HParamsError) as e:
        hp.validate()
    assert str(e.value) == "invalid hyperparameter 'rewards.adaptive_kl.horizon': must be > 0"
    assert e.value.key == "rewards.adaptive_kl.horizon"
    hp.override_from_args(["--rewards.adaptive_kl=off", "--ppo.nminibatches=3", "--ppo.total_episodes=10"])
    with pytest.raises(HParamsError, match="'ppo.nminibatches': must divide"):
        hp.validate()


def test_validate_checks_types():
    hp = TrainParams()
    hp.ppo.noptepochs = "4"
    with pytest.raises(HParamsError, match="'ppo.noptepochs' expects int"):
        hp.validate()
    hp = TrainParams()
    hp.task.sampler = "beam"
    with pytest.raises(HParamsError, match="task.sampler"):
        hp.validate()
    hp = TrainParams()
    hp.task.start_text = "None"  # a str in an Optional[str] field is fine
    hp.validate()


def test_to_dict_is_nested_and_json_serialisable():
    hp = TrainParams()
    d = hp.to_dict()
    assert d["rewards"]["adaptive_kl"] is None
    assert d["task"]["devices"] == [0]
    assert json.loads(json.dumps(d)) == d


def test_json_round_trip(tmp_path):
    hp = TrainParams()
    hp.override_from_args(["--rewards.adaptive_kl.target=3", "--task.devices=1,2", "--task.tags=x,y",
                           "--task.start_text=", "--ppo.seed=7", "--ppo.cliprange=none"])
    path = tmp_path / "hparams.json"
    hp.to_json(str(path))
    loaded = TrainParams.from_json(str(path))
    assert loaded == hp
    assert loaded.task.devices == (1, 2) and isinstance(loaded.task.devices, tuple)
    assert loaded.flat_items() == hp.flat_items()
    assert TrainParams.from_dict(TrainParams().to_dict()) == TrainParams()


def test_from_dict_strict_and_partial():
    with pytest.raises(HParamsError, match="unknown hyperparameter 'ppo.lrr'; did you mean 'ppo.lr'"):
        TrainParams.from_dict({"ppo": {"lrr": 1.0}})
    with pytest.raises(HParamsError, match="unknown hyperparameter 'bogus'"):
        TrainParams.from_dict({"bogus": 1})
    with pytest.raises(HParamsError, match="'ppo.lr' expects float"):
        TrainParams.from_dict({"ppo": {"lr": "abc"}})
    with pytest.raises(HParamsError, match="'ppo' expects a dict"):
        TrainParams.from_dict({"ppo": 3})
    hp = TrainParams.from_dict({"ppo": {"lr": 1}, "rewards": {"adaptive_kl": {}}})
    assert hp.ppo.lr == 1.0 and hp.ppo.noptepochs == 4
    assert hp.rewards.adaptive_kl == AdaptiveKLParams()


def test_instances_do_not_share_state():
    a, b = TrainParams(), TrainParams()
    a.override_from_pair("task.tags", "x")
    a.override_from_pair("rewards.adaptive_kl.target", "1")
    assert b.task.tags == [] and b.rewards.adaptive_kl is None


def test_on_off_words_for_non_section_fields():
    hp = TrainParams()
    hp.override_from_args(["--run_name=on", "--debug", "on", "--rewards.adaptive_kl", "on"])
    assert hp.run_name == "on" and hp.debug is True and hp.rewards.adaptive_kl == AdaptiveKLParams()
    hp.override_from_args(["--rewards.adaptive_kl", "false", "--debug=off"])
    assert hp.rewards.adaptive_kl is None and hp.debug is False


def test_sections_can_be_assigned_instances():
    hp = TrainParams()
    kl = AdaptiveKLParams(target=1.0)
    hp.override_from_pair("rewards.adaptive_kl", kl)
    assert hp.rewards.adaptive_kl == kl and hp.rewards.adaptive_kl is not kl  # copied
    with pytest.raises(HParamsError, match="expects on or off"):
        hp.override_from_pair("rewards.adaptive_kl", PPOParams())


def test_section_with_required_fields_cannot_default_on():
    @dataclass
    class Needs(HParams):
        x: int

    @dataclass
    class Top(HParams):
        needs: Optional[Needs] = None

    with pytest.raises(HParamsError, match="'needs' cannot be turned on with defaults"):
        Top().override_from_pair("needs.x", "1")
    assert Top.from_dict({"needs": {"x": 2}}).needs == Needs(x=2)
    with pytest.raises(HParamsError, match="cannot build 'needs'"):
        Top.from_dict({"needs": {}})


# ---- descriptions (--help), read from the comments on the declarations ----

@dataclass
class Documented(HParams):
    """A section."""

    lr: float = 1e-3  # learning rate
    # Two lines of comment
    # above a field.
    steps: int = 10
    bare: int = 0
    kl: Optional[AdaptiveKLParams] = None  # adaptive KL (text after '#' # is kept)


@dataclass
class MoreDocumented(Documented):
    extra: str = "x"  # a field of the subclass


def test_field_docs_come_from_comments_on_or_above_each_field():
    from lm_human_preferences.hparams_help import field_docs

    assert field_docs(MoreDocumented) == {"lr": "learning rate", "steps": "Two lines of comment above a field.",
                                          "bare": "", "kl": "adaptive KL (text after '#' # is kept)",
                                          "extra": "a field of the subclass"}


def test_help_lines_group_keys_by_section_with_values_and_descriptions():
    from lm_human_preferences.hparams_help import help_lines

    hp = MoreDocumented()
    hp.override_from_pair("lr", "0.5")
    lines = help_lines(hp)
    assert [line.split()[0] for line in lines if line.startswith("  --")] == [
        "--lr=0.5", "--steps=10", "--bare=0", "--kl=off", "--extra=\"x\"", "--kl.target=6.0", "--kl.horizon=10000"]
    assert lines[:4] == ["  --lr=0.5", "      learning rate", "  --steps=10", "      Two lines of comment above a field."]
    assert "kl: adaptive KL (text after '#' # is kept) (off: --kl=on or setting any of its keys turns it on)" in lines
    hp.override_from_pair("kl.target", "3")
    lines = help_lines(hp)
    assert "kl: adaptive KL (text after '#' # is kept)" in lines and "  --kl=on" in " ".join(lines)
    assert lines[lines.index("kl: adaptive KL (text after '#' # is kept)") + 1] == "  --kl.target=3.0"


@dataclass
class Numbers(HParams):
    x: float = 1.0
    maybe: Optional[float] = None
    n: int = 1

    def _validate(self):
        check_count(self, "n")


@pytest.mark.parametrize("key, value, message", [
    ("x", "nan", "'x': must be a finite number (got nan)"),
    ("x", "-inf", "'x': must be a finite number (got -inf)"),
    ("maybe", "1e400", "'maybe': must be a finite number (got inf)"),
    ("n", "0", "'n': must be an integer >= 1 and <= 2**40 (got 0)"),
    ("n", "1e20", "'n': must be an integer >= 1 and <= 2**40 (got 100000000000000000000)"),
])
def test_every_number_has_a_range(key, value, message):
    hp = Numbers()
    hp.override_from_pair(key, value)  # parsing accepts it; validate() refuses it
    with pytest.raises(HParamsError) as e:
        hp.validate()
    assert str(e.value) == f"invalid hyperparameter {message}"
    hp.maybe, hp.x, hp.n = None, -1e300, 2**40  # finite floats and counts up to 2**40 are fine
    hp.validate()


def test_ints_beyond_int64_are_refused_in_every_section():
    @dataclass
    class Inner(HParams):
        seed: int = 0  # no range of its own

    @dataclass
    class Outer(HParams):
        inner: Inner = field(default_factory=Inner)

    hp = Outer()
    hp.override_from_pair("inner.seed", str(2**63))
    with pytest.raises(HParamsError, match=r"'inner.seed': must be an integer between -2\*\*63 and 2\*\*63 - 1"):
        hp.validate()
    hp.override_from_pair("inner.seed", str(-2**63))
    hp.validate()

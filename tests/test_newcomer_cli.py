"""What a newcomer meets first: ``actsparse train --help``, a typo in a config file, the
FrequencyKL knobs on the command line, self-contained guides and install hints that work from a
clone."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import actsparse.functional as F
from actsparse.build import build_model
from actsparse.cli import _parse, main
from actsparse.config import FIELD_GROUPS, ConfigError, TrainConfig, install_hint, load_config_file
from actsparse.penalties import PENALTIES, FrequencyKL

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, columns: int = 80) -> subprocess.CompletedProcess:
    env = os.environ | {"COLUMNS": str(columns), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "actsparse", *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=ROOT)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its whole entry (flag line and help lines) in argparse's layout."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        m = re.match(r"  (-h, )?(--[a-z][\w-]*)", line)
        if m:
            current = m.group(2)
            entries[current] = line
        elif current and line.startswith("    "):
            entries[current] += "\n" + line
        else:
            current = None
    return entries


@pytest.fixture(scope="module")
def train_help() -> str:
    r = run_cli("train", "--help")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    return r.stdout


# ------------------------------------------------------------------------------------------------ help


def test_help_fits_80_columns_in_plain_text(train_help):
    lines = train_help.splitlines()
    too_long = [ln for ln in lines if len(ln) > 80]
    assert not too_long, f"lines over 80 characters: {too_long}"
    assert "``" not in train_help
    assert "{None}|" not in train_help
    assert not re.search(r":(class|func|mod|meth):`", train_help)
    assert "╭" not in train_help and "│" not in train_help  # no box: copy-pastable flags
    assert "(default:" not in train_help  # tyro's own suffix would double the defaults


def test_help_has_every_group_heading(train_help):
    headings = [ln[:-1] for ln in train_help.splitlines() if ln.endswith(":") and not ln.startswith(" ")]
    for heading in FIELD_GROUPS:
        assert heading in headings, f"no '{heading}:' heading in the help: {headings}"
    for heading in ("data", "model", "optimisation", "logging"):
        assert heading in headings
    assert any(h.startswith("penalty") for h in headings) and any(h.startswith("run") for h in headings)


def test_every_field_is_in_exactly_one_group():
    grouped = [name for names in FIELD_GROUPS.values() for name in names]
    fields = [f.name for f in dataclasses.fields(TrainConfig)]
    assert sorted(grouped) == sorted(fields)
    assert len(grouped) == len(set(grouped))


def test_help_flags_are_in_their_groups(train_help):
    sections = re.split(r"^(\S[^\n]*):$", train_help, flags=re.M)
    by_heading = {sections[i]: sections[i + 1] for i in range(1, len(sections) - 1, 2)}
    for heading, names in FIELD_GROUPS.items():
        entries = help_entries(by_heading[heading])
        for name in names:
            assert flag(name) in entries, f"{flag(name)} is not under '{heading}:'"


def test_every_penalty_name_is_listed(train_help):
    entry = help_entries(train_help)["--penalty"]
    names = re.search(r"--penalty \{([^}]*)\}", entry).group(1).split(",")
    assert set(names) == set(PENALTIES) | {"none"}


def test_literal_choices_are_listed(train_help):
    entries = help_entries(train_help)
    assert "{sigmoid,relu,topk,batchtopk,jumprelu,gated,ksparse}" in entries["--activation"]
    assert "{lbfgs,adam,sgd}" in entries["--optimizer"]
    assert "{stop,rollback}" in entries["--on-nan"]
    assert "--sizes INT [INT ...]" in entries["--sizes"]


def test_each_flag_shows_its_default_once(train_help):
    entries = help_entries(train_help)
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        entry = entries.get(flag(f.name))
        assert entry is not None, f"{flag(f.name)} missing from the help"
        assert len(re.findall(r"default", entry, flags=re.I)) == 1, entry
        shown = re.search(r"Default: (.*)", " ".join(entry.split())).group(1)
        value = getattr(defaults, f.name)
        if isinstance(value, bool):
            assert shown.startswith("on" if value else "off"), entry
        elif isinstance(value, (int, float)):
            assert float(re.match(r"[\d.e+-]+", shown).group(0).rstrip(".")) == value, entry
        elif isinstance(value, str):
            assert shown.startswith(value), entry
    assert "Default: 0.1" in entries["--bandwidth"] and F.DEFAULT_BANDWIDTH == 0.1


def test_help_lists_the_flags_tyro_parses(train_help):
    """The help is drawn from TrainConfig, the parsing is tyro's: they must name the same flags."""
    tyro_extras = pytest.importorskip("tyro.extras")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        parser = tyro_extras.get_parser(TrainConfig)
    tyro_flags = {o for a in parser._actions for o in a.option_strings}
    shown = set(re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", "\n".join(
        ln for ln in train_help.splitlines() if re.match(r"  -", ln))))
    assert shown == tyro_flags


@pytest.mark.parametrize("args", [
    ["--data", "digits", "--hidden", "7", "--no-plots", "--no-progress", "--weight-decay", "0"],
    ["--penalty", "none", "--tied", "--overwrite", "--name", "x", "--sizes", "3", "2"],
])
def test_existing_flag_names_still_parse(args):
    import tyro

    cfg = _parse(tyro, TrainConfig, args=args)
    assert isinstance(cfg, TrainConfig)
    assert cfg.to_dict().keys() == TrainConfig().to_dict().keys()  # still one flat config


def test_help_with_a_config_file_shows_its_values(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("hidden = 77\n")
    r = run_cli("train", "--config", str(path), "--help")
    assert r.returncode == 0, r.stderr
    assert "Default: 77." in help_entries(r.stdout)["--hidden"]


def test_bad_flag_still_one_line_exit_2():
    r = run_cli("train", "--no-plot")
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0, r.stderr
    assert "did you mean --no-plots?" in r.stderr


@pytest.mark.parametrize("command", ["gradcheck", "cache-activations"])
def test_other_commands_help_is_plain_too(command):
    r = run_cli(command, "--help")
    assert r.returncode == 0, r.stderr
    assert all(len(ln) <= 80 for ln in r.stdout.splitlines())
    assert "``" not in r.stdout and "{None}|" not in r.stdout and "(default:" not in r.stdout


# ------------------------------------------------------------------------------------ config typo


@pytest.mark.parametrize(("name", "text"), [("c.toml", "hiden = 30\n"), ("c.yaml", "hiden: 30\n"),
                                            ("c.yml", "batch_sise: 30\n")])
def test_config_file_typo_gets_the_command_line_hint(tmp_path, capsys, name, text):
    wanted = "--hidden" if "hiden" in text else "--batch-size"
    bad = text.split(":")[0].split("=")[0].strip()
    # the hint the command line gives for the same typo
    assert main(["train", "--" + bad.replace("_", "-"), "30"]) == 2
    line = capsys.readouterr().err.strip()
    assert f"(did you mean {wanted}?)" in line
    # the same hint from the file
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"unknown setting\(s\) {bad} \(did you mean {wanted}\?\)"):
        load_config_file(path)
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and f"(did you mean {wanted}?)" in err


def test_config_file_without_a_close_match_has_no_hint(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("zzzzzz = 1\n")
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    assert "did you mean" not in str(info.value) and "zzzzzz" in str(info.value)


def test_config_file_takes_flag_spelling(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("batch-size = 64\nweight_decay = 0.0\n")
    assert load_config_file(path) == {"batch_size": 64, "weight_decay": 0.0}
    path.write_text("batch-size = 64\nbatch_size = 32\n")
    with pytest.raises(ConfigError, match="set twice"):
        load_config_file(path)


# ------------------------------------------------------------------------- --bandwidth, --threshold


def test_bandwidth_and_threshold_reach_frequency_kl():
    import tyro

    cfg = _parse(tyro, TrainConfig, args=["--activation", "relu", "--decoder", "linear", "--penalty",
                                          "frequency_kl", "--target", "0.1", "--bandwidth", "0.37",
                                          "--threshold", "0.2"])
    assert (cfg.bandwidth, cfg.threshold) == (0.37, 0.2)
    penalty = build_model(cfg, 6).penalty
    assert isinstance(penalty, FrequencyKL)
    assert penalty.bandwidth == 0.37 and penalty.threshold == 0.2 and penalty.target == 0.1
    # and the math uses them: a > θ fires; the pseudo-gradient reaches |a − θ| < ε/2 only
    a = torch.tensor([[0.1, 0.25, 0.36, 0.5]] * 4, requires_grad=True)
    rate = penalty.rate(a)
    assert rate.tolist() == [0.0, 1.0, 1.0, 1.0]
    rate.sum().backward()
    assert (a.grad[0] != 0).tolist() == [True, True, True, False]  # 0.1, 0.25, 0.36 within 0.185 of 0.2


def test_frequency_kl_defaults_without_the_flags():
    cfg = TrainConfig(activation="relu", decoder="linear", penalty="frequency_kl", target=0.1)
    penalty = build_model(cfg, 6).penalty
    assert penalty.bandwidth == F.DEFAULT_BANDWIDTH and penalty.threshold == 0.0


@pytest.mark.parametrize("args", [["--bandwidth", "0.3"], ["--threshold", "0.5", "--penalty", "l1"],
                                  ["--penalty", "none", "--bandwidth", "0.3"]])
def test_bandwidth_threshold_refused_for_other_penalties(tmp_path, capsys, args):
    assert main(["train", *args, "--out", str(tmp_path), "--iterations", "1", "--no-progress", "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "only to --penalty frequency_kl" in err
    assert not any(tmp_path.iterdir())  # nothing trained


@pytest.mark.parametrize(("kwargs", "match"), [({"bandwidth": 0.0}, "must be > 0"), ({"bandwidth": -1}, "> 0"),
                                               ({"threshold": float("nan")}, "finite"),
                                               ({"bandwidth": "wide"}, "finite number")])
def test_bandwidth_threshold_validated(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(penalty="frequency_kl", target=0.1, **kwargs)


def test_bandwidth_round_trips_through_config_json(tmp_path):
    cfg = TrainConfig(penalty="frequency_kl", target=0.1, bandwidth=0.3, threshold=0.0)
    cfg.save(tmp_path / "config.json")
    import json

    again = TrainConfig(**json.loads((tmp_path / "config.json").read_text()))
    assert (again.bandwidth, again.threshold) == (0.3, 0.0)


# --------------------------------------------------------------------------------- self-contained docs


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), *sorted((ROOT / "examples").rglob("*"))]
    return [p for p in files if p.is_file() and p.suffix in (".md", ".py", ".txt", ".toml", ".yaml", ".sh")]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_docs_do_not_cite_a_missing_guide(path):
    hits = [f"{i}: {ln.strip()}" for i, ln in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
            if "GUIDE" in ln]
    assert not hits, f"{path.relative_to(ROOT)} cites a document the project does not have: {hits}"


def test_frequency_guide_shows_the_flags():
    text = (ROOT / "docs" / "001-activation-frequency.md").read_text(encoding="utf-8")
    assert re.search(r"actsparse train .*\n?.*--penalty frequency_kl.*--bandwidth", text)
    assert "--threshold" in text


# ---------------------------------------------------------------------------------------- install hints

RELEASED = re.compile(r"""pip install\s+["']?actsparse\[([\w,]+)\]""")


def hint_files() -> list[Path]:
    files = [*sorted((ROOT / "actsparse").rglob("*.py")), *doc_files()]
    return [p for p in files if "__pycache__" not in p.parts]


def test_install_hint_text():
    hint = install_hint("keras")
    assert "pip install -e '.[keras]'" in hint and "pip install 'actsparse[keras]'" in hint
    assert "clone" in hint


@pytest.mark.parametrize("path", hint_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_released_install_hints_have_the_clone_form_next_to_them(path):
    """``pip install 'actsparse[x]'`` fails from a clone (actsparse is not on PyPI): each one must
    come with ``pip install -e '.[x]'`` on the same line or the lines around it."""
    lines = path.read_text(encoding="utf-8").splitlines()
    bad = []
    for i, line in enumerate(lines):
        for m in RELEASED.finditer(line):
            near = "\n".join(lines[max(0, i - 2):i + 3])
            clone = re.compile(r"""pip install -e\s+["']?\.\[""" + re.escape(m.group(1)) + r"\]")
            if not clone.search(near):
                bad.append(f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not bad, "released-only install hints (use actsparse.config.install_hint):\n" + "\n".join(bad)


def test_missing_cli_dependency_hint_has_the_clone_form():
    from actsparse.cli import _MissingExtra, _need

    with pytest.raises(_MissingExtra, match=re.escape("pip install -e '.[cli]'")):
        _need("actsparse_no_such_module_for_the_test")


# --------------------------------------------------------------------------------- recipe defaults


@pytest.mark.parametrize("fields, wd, target", [
    ({}, 1e-4, 0.01),                                                  # CS294A
    ({"whiten": "none"}, 1e-4, 0.01),
    ({"whiten": "zca", "decoder": "linear"}, 3e-3, 0.01),              # UFLDL linear decoder
    ({"data": "digits"}, 3e-3, 0.1),                                   # UFLDL MNIST
    ({"data": "digits", "target": 0.05}, 3e-3, 0.05),                  # a given value wins
    ({"data": "digits", "weight_decay": 0.0}, 0.0, 0.1),               # 0 is a value, not "unset"
    ({"whiten": "zca", "decoder": "linear", "weight_decay": 1e-4}, 1e-4, 0.01),
    ({"data": "synthetic", "decoder": "linear"}, 0.0, 0.01),             # an SAE recipe: no weight decay
    ({"data": "synthetic", "recipe": "classic", "decoder": "linear"}, 1e-4, 0.01),
])
def test_recipe_defaults(fields, wd, target):
    cfg = TrainConfig(**fields)
    assert (cfg.weight_decay, cfg.target) == (wd, target)


def test_recipe_defaults_recorded_and_resumed(tmp_path, capsys):
    """config.json holds the number used, and a resume (without the flags) keeps it."""
    import json

    common = ["--out", str(tmp_path), "--name", "d", "--no-progress", "--no-plots", "--threads", "1"]
    assert main(["train", "--data", "digits", "--hidden", "16", "--iterations", "6", *common]) == 0
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (saved["weight_decay"], saved["target"]) == (3e-3, 0.1)
    assert main(["train", "--resume", "--iterations", "9", *common]) == 0
    saved = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (saved["weight_decay"], saved["target"], saved["iterations"]) == (3e-3, 0.1, 9)
    # "None" on the command line unsets a config file's value: the recipe default comes back
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text('data = "digits"\nweight_decay = 0.5\n')
    common[3] = "e"
    assert main(["train", "--config", str(cfg_file), "--weight-decay", "None", "--hidden", "16",
                 "--iterations", "2", *common]) == 0
    assert json.loads((tmp_path / "e" / "config.json").read_text())["weight_decay"] == 3e-3


def test_help_shows_a_config_files_value_for_a_recipe_field(tmp_path):
    cfg_file = tmp_path / "c.toml"
    cfg_file.write_text("weight_decay = 0.5\n")
    out = run_cli("train", "--config", str(cfg_file), "--help").stdout
    entry = help_entries(out)["--weight-decay"]
    assert "Default: 0.5." in entry and "3e-3" not in entry, entry

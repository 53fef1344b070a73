"""configurator.py: overrides, config files, errors that name the key, one-line errors."""
import os
import re
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, run

from configurator import configure


def test_configure_parses_files_flags_and_space_separated_values(tmp_path):
    scope = dict(lr=1e-4, steps=10, cep=False, name="a", corrupt=0.0)
    (tmp_path / "cfg.py").write_text("steps = 20\nname = 'b'\n")
    config = configure(scope, [str(tmp_path / "cfg.py"), "--corrupt", "0.05", "--cep", "--lr=3e-4", "--steps", "7"])
    assert config == dict(lr=3e-4, steps=7, cep=True, name="b", corrupt=0.05)
    assert configure(dict(cep=True), ["--cep=False"]) == dict(cep=False)
    assert configure(dict(x=1.0), ["--x=2"]) == dict(x=2.0)
    # a string's value may start with -- (study.py's pass-through arguments); a flag before another key stays a flag
    assert configure(dict(train_args="", cep=False, steps=1), ["--train_args", "--max_steps 100 --cep", "--cep",
                                                               "--steps", "2"]) == \
        dict(train_args="--max_steps 100 --cep", cep=True, steps=2)


@pytest.mark.parametrize("argv, message", [(["--nope=1"], "unknown config key 'nope'"),
                                           (["--steps=1.5"], "steps"), (["--steps=abc"], "steps"),
                                           (["--cep=maybe"], "cep"), (["stray", "--x"], "stray")])
def test_configure_errors_name_the_key(argv, message, tmp_path):
    os.chdir(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        configure(dict(steps=10, cep=False), argv)


def test_config_file_errors_name_the_file_and_line(tmp_path):
    (tmp_path / "syntax.py").write_text("max_steps = 3\nlr = = 2\n")
    (tmp_path / "name.py").write_text("max_steps = 3\n\nlr = three\n")
    for name, message in [("syntax.py", "line 2: invalid syntax: lr = = 2"), ("name.py", "line 3: NameError")]:
        with pytest.raises(ValueError, match=re.escape(f"config file {tmp_path / name}, {message}")):
            configure(dict(max_steps=1, lr=0.1), [str(tmp_path / name)])


@pytest.mark.slow
def test_expected_errors_end_in_one_line_unexpected_ones_keep_their_traceback(tmp_path):
    (tmp_path / "cfg.py").write_text("max_steps = 3\nlr = = 2\n")
    result = run([sys.executable, "train.py", str(tmp_path / "cfg.py")], check=False)
    assert result.returncode == 1 and result.stderr == \
        f"error: config file {tmp_path / 'cfg.py'}, line 2: invalid syntax: lr = = 2 (DEBUG=1 shows the traceback)\n"
    debug = subprocess.run([sys.executable, "train.py", str(tmp_path / "cfg.py")], cwd=ROOT, capture_output=True,
                           text=True, env=dict(ENV, DEBUG="1"))
    assert debug.returncode == 1 and "Traceback" in debug.stderr and debug.stderr.endswith("lr = = 2\n")
    # a bug (here a shape error inside torch) is no expected error: its traceback stays
    bug = run([sys.executable, "-c", "import configurator, torch\nconfigurator.configure({}, [])\n"
               "torch.zeros(2) @ torch.zeros(3)"], check=False)
    assert bug.returncode == 1 and "Traceback" in bug.stderr and "error: " not in bug.stderr

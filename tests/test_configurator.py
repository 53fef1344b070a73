"""configurator.py: overrides, config files, errors that name the key, one-line errors."""
import os
import re
import subprocess
import sys

import pytest
from conftest import ENV, ROOT, run

from configurator import atomic_write, configure


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


SCRIPT = '''"""
A script, in one line.

  python script.py --steps 3     # an example
      # continued

Prose after the examples, not usage.
"""
import os

# -----------------------------------------------------------------------------
# the data
steps = 10                # how many steps: a comment
                          # that goes on here
name = "a b"
# optimisation
lr = 1e-3                 # the learning rate
NOT_A_SETTING = 1
if __name__ == "__main__":
    # inside the main block
    workers = 2           # data loader processes
'''


def test_help_prints_usage_settings_defaults_and_comments_grouped_as_in_the_script(tmp_path, capsys):
    path = tmp_path / "script.py"
    path.write_text(SCRIPT)
    scope = dict(__file__=str(path), __doc__=SCRIPT.split('"""')[1], steps=10, name="a b", lr=1e-3, workers=2,
                 NOT_A_SETTING=1, late=None)
    for argv in (["--help"], ["-h"], ["--steps=3", "--help"], ["--lr", "2", "-h"]):
        with pytest.raises(SystemExit) as exit:
            configure(dict(scope), argv)
        assert exit.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith("A script, in one line.\n\n  python script.py --steps 3     # an example\n"
                              "      # continued\n\nSettings")
        assert "Prose after" not in out and "---" not in out and "NOT_A_SETTING" not in out
        settings = out.split("first argument.\n")[1]
        assert settings == ("\nthe data\n"
                            "  --steps=10                how many steps: a comment\n"
                            "                            that goes on here\n"
                            "  --name='a b'\n"
                            "\noptimisation\n"
                            "  --lr=0.001                the learning rate\n"
                            "\ninside the main block\n"
                            "  --workers=2               data loader processes\n"
                            "\nother settings\n"
                            "  --late=None\n")
    # a string's value may be --help itself, a setting named help is a setting
    assert configure(dict(args=""), ["--args", "--help"]) == dict(args="--help")
    assert configure(dict(help=False), ["--help"]) == dict(help=True)


SCRIPTS = ["train.py", "sample.py", "evaluate.py", "study.py", "bench.py", "data.py", "adapt.py", "distill.py"]


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_answers_help_with_its_settings_and_their_comments(script):
    if not os.path.exists(os.path.join(ROOT, script)):
        pytest.skip(f"{script} does not exist (yet)")
    source = open(os.path.join(ROOT, script), encoding="utf-8").read()
    # the first setting with a comment, as the script writes it: `name = value   # comment` (data.py: in its main)
    name, comment = re.search(r"^(?:    )?([a-z_]\w*) = [^#\n]+?  +# (.+)$", source, re.M).groups()
    for flag in ("--help", "-h"):
        result = run([sys.executable, script, flag], check=False)
        assert result.returncode == 0 and result.stderr == "", result.stderr
        assert re.search(rf"^  --{name}=\S*\s+{re.escape(comment)}$", result.stdout, re.M), result.stdout
        assert "python" in result.stdout.split("Settings")[0]  # the usage comes first
    if script == "train.py":
        assert "\n  --ema_decay=0.995         DiT: 0.9999 over 400K steps; a short run needs a short average\n" in \
            result.stdout
        assert "\n                            with a text encoder an image-caption set (data.ImageCaptions" in \
            result.stdout and "\noptimisation\n" in result.stdout


def test_two_writers_of_one_file_each_write_a_temporary_file_of_their_own(tmp_path):
    path = tmp_path / "cache.bin"
    with atomic_write(path) as first:
        first.write(b"first " * 1000)
        with atomic_write(path) as second:  # a second writer while the first is in flight
            second.write(b"second")
            assert first.name != second.name and os.path.dirname(second.name) == str(tmp_path)
            assert re.fullmatch(rf"cache\.bin\.{os.getpid()}\.\w+\.tmp", os.path.basename(second.name))
        assert path.read_bytes() == b"second"
        first.write(b"end")
    assert path.read_bytes() == b"first " * 1000 + b"end"  # whole: nothing of the second's in it
    assert os.listdir(tmp_path) == ["cache.bin"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # as open() makes it, not mkstemp's 0600
    with pytest.raises(KeyError):  # a failing writer removes its temporary file and keeps the previous file
        with atomic_write(path, "w") as f:
            f.write("half")
            raise KeyError
    assert path.read_bytes() == b"first " * 1000 + b"end" and os.listdir(tmp_path) == ["cache.bin"]


def test_concurrent_processes_filling_one_cache_leave_a_whole_file(tmp_path):
    writer = ("import sys\nfrom configurator import atomic_write\nfor i in range(200):\n"
              "    with atomic_write(sys.argv[1]) as f:\n        f.write(sys.argv[2].encode() * 20000)\n")
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(tmp_path / "cache"), letter], cwd=ROOT, env=ENV,
                              stderr=subprocess.PIPE, text=True) for letter in "ab"]
    errors = [proc.communicate(timeout=120)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert (tmp_path / "cache").read_bytes() in (b"a" * 20000, b"b" * 20000)
    assert os.listdir(tmp_path) == ["cache"]


def test_settings_taken_from_elsewhere_are_an_error_that_says_where_from():
    scope = dict(lr=1.0, __file__="/x/adapt.py")
    taken = (("model", "vae"), "the checkpoint")
    assert configure(dict(scope), ["--lr=2"], taken)["lr"] == 2.0
    with pytest.raises(ValueError, match="^model, vae: adapt.py takes these from the checkpoint; drop them from"):
        configure(dict(scope), ["--vae=x", "--model", "DiT-S/2", "--lr=2"], taken)
    with pytest.raises(ValueError, match="^vae: adapt.py takes this from the checkpoint; drop it from"):
        configure(dict(scope), ["--vae=x"], taken)

"""
nanoGPT-style configuration, shared by the scripts (train.py, sample.py, evaluate.py, study.py, bench.py, data.py).

The defaults are the module-level variables of the calling script. They are overridden, in order, by a Python
config file given as the first argument, then by `--key=value` or `--key value` on the command line; a bare
`--flag` means `--flag=True` (a string key always takes the next argument). A key that is not a default, or a value
of the wrong type, is an error naming it. `--help` or `-h` prints the script's usage and its settings with their
defaults and comments, grouped as in the script (read from its source), and exits.

Also what every script shares: errors that end in one line (one_line_errors, installed by configure), and files
written whole or not at all (atomic_write).
"""
import ast
import contextlib
import errno
import io
import os
import re
import secrets
import shlex
import sys
import tokenize
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))


def _convert(key, value, default):
    if isinstance(default, str) or (default is None and isinstance(value, str)):
        return value if isinstance(value, str) else str(value)
    if isinstance(value, str):
        if isinstance(default, bool) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"--{key}={value!r}: expected a {type(default).__name__}") from None
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if default is not None and type(value) is not type(default):
        raise ValueError(f"--{key}={value!r}: expected a {type(default).__name__} like the default {default!r}")
    return value


def configure(scope, argv, taken=((), "")):
    """Apply a config file and command-line overrides to `scope` (a script's globals()); returns the config as a
    plain dict of the keys that are configurable (every lower-case module-level int/float/bool/str/None). taken:
    (keys, where from): settings the script takes from elsewhere (adapt.py's model, from its checkpoint), which are
    an error that says so."""
    keys = {k for k, v in scope.items() if not k.startswith("_") and k.islower()
            and (v is None or isinstance(v, (int, float, bool, str)))}
    overrides = []
    sys.excepthook = one_line_errors
    if argv and argv[0] in HELP and argv[0][2:] not in keys:
        print_help(scope, keys)
    if argv and not argv[0].startswith("--"):
        file_scope = {}
        if not os.path.isfile(argv[0]):
            raise FileNotFoundError(f"config file {argv[0]!r} not found (the first argument, unless it is --key)")
        with open(argv[0]) as f:
            source = f.read()
        try:
            exec(compile(source, argv[0], "exec"), file_scope)
        except SyntaxError as e:
            raise ValueError(f"config file {argv[0]}, line {e.lineno}: {e.msg}: {(e.text or '').strip()}") from None
        except Exception as e:
            line = [fr.lineno for fr in traceback.extract_tb(e.__traceback__) if fr.filename == argv[0]][-1]
            raise ValueError(f"config file {argv[0]}, line {line}: {type(e).__name__}: {e}") from e
        overrides += [(k, v) for k, v in file_scope.items() if not k.startswith("__")]
        argv = argv[1:]
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in HELP and arg[2:] not in keys:
            print_help(scope, keys)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --key=value or --key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and (not argv[i + 1].startswith("--") or isinstance(scope.get(arg[2:]), str)):
            # a string's value may start with -- itself: study.py --train_args "--max_steps 100"
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "True"
        overrides.append((key, value))
        i += 1
    given = sorted({key for key, _ in overrides} & set(taken[0]))
    if given:
        script = os.path.basename(scope.get("__file__") or "this script")
        raise ValueError(f"{', '.join(given)}: {script} takes {'this' if len(given) == 1 else 'these'} from "
                         f"{taken[1]}; drop {'it' if len(given) == 1 else 'them'} from the command line")
    for key, value in overrides:
        if key not in keys:
            raise ValueError(f"unknown config key {key!r}; the keys are: {', '.join(sorted(keys))}")
        scope[key] = _convert(key, value, scope[key])
    return {k: scope[k] for k in sorted(keys)}


HELP = ("-h", "--help")


def print_help(scope, keys):
    """Prints the script's usage (its docstring up to its example commands) and its settings with their defaults and
    comments, grouped as in the script, then exits 0."""
    path = scope.get("__file__") or ""
    documented = documented_settings(path, keys) if os.path.isfile(path) else []
    named = {name for _, name, _ in documented}
    undocumented = sorted(set(keys) - named)  # set where the source shows no plain assignment of them
    documented += [(["other settings"] if i == 0 else [], name, []) for i, name in enumerate(undocumented)]
    column = 28  # the scripts' comment column (26), moved right by the `  --`
    lines = [usage(scope.get("__doc__")), "",
             "Settings, with their defaults: --key=value or --key value (a bare --flag is True), or a Python file",
             "of them as the first argument."]
    for headings, name, comment in documented:
        for heading in headings:
            lines += ["", heading]
        setting = f"  --{name}={shown(scope[name])}"
        if not comment:
            lines.append(setting)
            continue
        if len(setting) > column - 2:  # a long default: its comment starts on the next line
            lines.append(setting)
            setting = ""
        lines.append(setting.ljust(column) + comment[0])
        lines += [" " * column + more for more in comment[1:]]
    try:
        print("\n".join(lines), flush=True)
    except BrokenPipeError:  # `--help | head`: the reader has what it wanted; Python would still flush at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    raise SystemExit(0)


def shown(value):
    """A default as it is written on a command line."""
    if isinstance(value, str):
        return shlex.quote(value)
    return repr(value)


def usage(doc):
    """A docstring up to the end of its first indented block (the example commands), else its first paragraph."""
    lines = (doc or "").strip("\n").splitlines()
    end = len(lines)
    indented = [i for i, line in enumerate(lines) if line.startswith(" ") and line.strip()]
    if indented:
        end = indented[0]
        while end < len(lines) and lines[end].startswith(" ") and lines[end].strip():
            end += 1
    elif "" in lines:
        end = lines.index("")
    return "\n".join(lines[:end])


def documented_settings(path, keys):
    """[(headings, name, comment lines)] of the settings assigned in the script at `path` (at the top level, or in a
    top-level `if`, e.g. `if __name__ == "__main__":`), in the order of the file. A setting's comment is the one on its
    line and the comment-only lines indented under it; its headings are the comment-only lines at its own indentation
    above it, down from the statement before (rules of dashes left out)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {}  # line number -> (column, text) of the lines that hold a comment
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = (token.start[1], token.string.lstrip("#").strip())
    lines = source.splitlines()

    def alone(n):  # the column of line n's comment where the line holds nothing else, else -1
        if n in comments and not lines[n - 1][:comments[n][0]].strip():
            return comments[n][0]
        return -1

    statements = []
    for node in ast.parse(source).body:
        if isinstance(node, ast.If):
            statements += node.body
        else:
            statements.append(node)
    settings, last_line = [], 0
    for node in statements:
        above = range(last_line + 1, node.lineno)  # the lines since the statement before
        last_line = node.end_lineno
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and node.targets[0].id in keys):
            continue
        indent = node.col_offset
        headings = [comments[n][1] for n in above if alone(n) == indent and set(comments[n][1]) - {"-"}]
        comment = [comments[n][1] for n in range(node.lineno, node.end_lineno + 1) if n in comments][:1]
        n = node.end_lineno + 1
        while comment and alone(n) > indent:
            comment.append(comments[n][1])
            n += 1
        settings.append((headings, node.targets[0].id, comment))
    return settings


def script_settings(path):
    """The settings of the script at `path` as its source writes them, without running it: the assignments of plain
    values at its top, up to the first statement that is none (a script that launches another checks the arguments
    it passes before any work, study.py)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    settings = {}
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (isinstance(node, ast.Expr) and not settings):
            continue
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            break
        try:
            value = ast.literal_eval(node.value)
        except ValueError:
            break
        if node.targets[0].id.islower() and (value is None or isinstance(value, (int, float, bool, str))):
            settings[node.targets[0].id] = value
    return settings


def one_line_errors(kind, error, tb):
    """sys.excepthook: an error our code raises on purpose (a bad setting, a missing or damaged file, a bad image:
    a `raise` of ValueError, OSError, RuntimeError or FloatingPointError in a file of this project, also in a data
    loader's worker) ends the script with `error: <message>`, one line on stderr, exit code 1. Anything else, or
    DEBUG=1 in the environment, keeps Python's traceback: unexpected errors are bugs, and bugs need it."""
    message = expected_error(error, tb)
    if message is None or os.environ.get("DEBUG", "0") not in ("", "0"):
        return sys.__excepthook__(kind, error, tb)
    if "tqdm" in sys.modules:  # a progress bar still drawn would swallow the line
        for bar in list(getattr(sys.modules["tqdm"].tqdm, "_instances", [])):
            bar.close()
    print(f"error: {message} (DEBUG=1 shows the traceback)", file=sys.stderr, flush=True)


def expected_error(error, tb):
    """The message of an error raised on purpose by this project's code, else None."""
    if not isinstance(error, (ValueError, OSError, RuntimeError, FloatingPointError)):
        return None
    # a DataLoader worker's error comes back as the same type whose message is the worker's traceback
    worker = re.search(r"Original Traceback \(most recent call last\):\n(.*)", str(error), re.S)
    if worker:  # (file, source line) of each frame, and the last line: "RuntimeError: <message>"
        frames = re.findall(r'^  File "(.+?)", line \d+, in .*\n +(.*)', worker[1], re.M)
        message = worker[1].strip().splitlines()[-1].split(": ", 1)[-1]
    else:
        frames, message = [(f.filename, f.line or "") for f in traceback.extract_tb(tb)], str(error)
    origin, line = frames[-1] if frames else ("", "")
    ours = os.path.isfile(origin) and os.path.dirname(os.path.abspath(origin)) == HERE
    return message if ours and line.startswith("raise ") and message else None


def temporary_path(path):
    """A name beside `path` for one writer's temporary file: <name>.<pid>.<random>.tmp. The random part keeps two
    writers apart in one process and on two machines that share the folder (a pid is unique on one machine only)."""
    folder, name = os.path.split(path)
    return os.path.join(folder, f"{name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")


@contextlib.contextmanager
def atomic_write(path, mode="wb"):
    """Open a temporary file of this writer's own beside `path` (temporary_path) to write `path`: on success the file
    is flushed to disk and renamed over `path`, so a kill or a full disk leaves the previous `path` (or none), never a
    half-written one, and two writers filling one cache each rename a whole file of their own. On failure the
    temporary file is removed, and a failed write (a full disk) is an OSError that names `path`. A SIGKILL can leave
    a <name>.<pid>.<random>.tmp: never a good one."""
    path = os.fspath(path)
    # opened as open() does (unlike tempfile.mkstemp's 0600, the permissions follow the umask), not exclusively: 64
    # random bits do not collide, and a test can put a FIFO at the name (temporary_path replaced) to kill a write
    # midway
    tmp = temporary_path(path)
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        cause = next((c for c in (e, e.__context__, e.__cause__) if isinstance(c, OSError)), None)
        if cause is None:
            raise
        full = cause.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)  # EFBIG: a file-size limit, a quota
        raise OSError(f"cannot write {path}: {cause.strerror or cause}"
                      f"{' (out of space: a full disk, a quota or a file-size limit)' if full else ''}; "
                      f"the previous {os.path.basename(path)}, if any, is kept") from e


def read_cache(path, load):
    """load(path), or None when the cache is missing or unreadable (cut short by a copy, or by a kill in a version
    that wrote in place): then the caller makes it again, and this says so."""
    if not os.path.isfile(path):
        return None
    try:
        return load(path)
    except Exception as e:
        print(f"the cache {path} is unreadable ({type(e).__name__}: {str(e).split('. ')[0]}): making it again")
        return None

"""
nanoGPT-style configuration, shared by train.py, sample.py and evaluate.py.

The defaults are the module-level variables of the calling script. They are overridden, in order, by a Python
config file given as the first argument, then by `--key=value` or `--key value` on the command line; a bare
`--flag` means `--flag=True`. A key that is not a default, or a value of the wrong type, is an error naming it.
"""
import ast


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


def configure(scope, argv):
    """Apply a config file and command-line overrides to `scope` (a script's globals()); returns the config as a
    plain dict of the keys that are configurable (every lower-case module-level int/float/bool/str/None)."""
    keys = {k for k, v in scope.items() if not k.startswith("_") and k.islower()
            and (v is None or isinstance(v, (int, float, bool, str)))}
    overrides = []
    if argv and not argv[0].startswith("--"):
        file_scope = {}
        with open(argv[0]) as f:
            exec(f.read(), file_scope)
        overrides += [(k, v) for k, v in file_scope.items() if not k.startswith("__")]
        argv = argv[1:]
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r}: use --key=value or --key value")
        if "=" in arg:
            key, value = arg[2:].split("=", 1)
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            key, value = arg[2:], argv[i + 1]
            i += 1
        else:
            key, value = arg[2:], "True"
        overrides.append((key, value))
        i += 1
    for key, value in overrides:
        if key not in keys:
            raise ValueError(f"unknown config key {key!r}; the keys are: {', '.join(sorted(keys))}")
        scope[key] = _convert(key, value, scope[key])
    return {k: scope[k] for k in sorted(keys)}

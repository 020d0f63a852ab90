"""
nanoGPT-style configuration: a script's plain globals are its defaults, then

    python train.py config/some_file.py --key=value --other_key value ...

applies config files (plain Python assignments) and --key overrides in argv order.
Compared with nanoGPT's configurator this one:
  - accepts `--key=value` and `--key value` (and a bare `--flag` for a bool key);
  - splits on the first '=' only (`--start="a=b"` works);
  - rejects unknown keys from the CLI *and* from config files, with a "did you mean";
  - checks types: int -> float widening is fine, true/false/True/False for bools,
    str keys take the raw text, tuple keys take a Python tuple/list literal;
  - prints one clear `error:` line and exits with status 2 on any mistake;
  - `--help` lists every key with its default.

Usage inside a script, after its globals:
    from configurator import configure
    config = configure(globals())   # mutates the globals, returns {key: value}
"""
import ast
import difflib
import json
import os
import sys

SIMPLE_TYPES = (bool, int, float, str, tuple, list, type(None))


class ConfigError(Exception):
    pass


def config_keys(g):
    """The configurable keys of a script: public globals of simple types (UPPER_CASE names are constants)."""
    return [k for k, v in g.items() if not k.startswith('_') and not k.isupper() and isinstance(v, SIMPLE_TYPES)]


def _unknown(key, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the list"
    return ConfigError(f"unknown config key '{key}'{hint}")


def coerce(key, value, default):
    """Convert `value` (a str from the CLI, or a Python object from a config file) to the type of
    `default`, or raise ConfigError naming the key, the value and the expected type."""
    expected = type(default)
    if isinstance(value, str) and expected is not str:
        if expected is bool and value in ('true', 'True', 'false', 'False'):
            return value in ('true', 'True')
        try:
            value = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            if default is not None:
                raise ConfigError(f"bad value for '{key}': {value!r} is not a valid {expected.__name__}")
    if default is None or expected is str and isinstance(value, str):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --lr=1 means 1.0
    if expected in (tuple, list) and isinstance(value, (tuple, list)):
        return expected(value)
    if type(value) is not expected:
        raise ConfigError(f"bad value for '{key}': {value!r} is a {type(value).__name__}, "
                          f"expected {expected.__name__} (default {default!r})")
    return value


def _apply_file(path, cfg, keys):
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    ns = dict(cfg)  # files may read the current values (e.g. lr_decay_iters = max_iters)
    try:
        with open(path, encoding='utf-8') as f:
            exec(compile(f.read(), path, 'exec'), ns)
    except Exception as e:  # a syntax error in a recipe is a user mistake, not a crash
        raise ConfigError(f"cannot run config file {path}: {type(e).__name__}: {e}")
    for k, v in ns.items():
        if k.startswith('_') or k == '__builtins__' or not isinstance(v, SIMPLE_TYPES):
            continue  # imports, helper functions
        if k not in keys:
            raise ConfigError(f"in {path}: " + str(_unknown(k, keys)))
        if v is not cfg[k]:
            cfg[k] = coerce(k, v, cfg[k])


def parse(argv, defaults):
    """Apply argv (config files and --key[=value] overrides, in order) to a copy of `defaults`."""
    cfg, keys = dict(defaults), list(defaults)
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith('--'):
            _apply_file(arg, cfg, keys)
            continue
        key, eq, value = arg[2:].partition('=')
        if key not in cfg:
            raise _unknown(key, keys)
        if not eq:  # `--key value`, or a bare `--flag` for a bool
            if i < len(argv) and not argv[i].startswith('--'):
                value, i = argv[i], i + 1
            elif isinstance(defaults[key], bool):
                value = 'True'
            else:
                raise ConfigError(f"missing value for '--{key}' (default {defaults[key]!r})")
        cfg[key] = coerce(key, value, defaults[key])
    return cfg


def print_help(defaults, script):
    print(f"usage: python {script} [config/file.py ...] [--key=value ...]\n\nkeys (default):")
    for k, v in defaults.items():
        print(f"  --{k:<28} {v!r}")


def configure(g, argv=None):
    """Resolve the config of a script whose globals are `g`; exit 2 with one line on a mistake."""
    argv = sys.argv[1:] if argv is None else argv
    defaults = {k: g[k] for k in config_keys(g)}
    if '--help' in argv or '-h' in argv:
        print_help(defaults, os.path.basename(sys.argv[0]))
        sys.exit(0)
    try:
        cfg = parse(argv, defaults)
    except ConfigError as e:
        die(e)
    g.update(cfg)
    return cfg


def die(msg):
    """A user mistake: one line on stderr, exit code 2 (train.py, sample.py and bench.py share it)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def check_ranges(g, checks):
    """checks: (key, ok, rule) with ok already evaluated on the globals g; the first failed one is a user mistake."""
    for key, ok, rule in checks:
        if not ok:
            die(f"{key}={g[key]!r} is out of range: {key} must be {rule}")


def save_json(obj, path):
    """Write JSON atomically (tmp + rename) so a crash never leaves half a file."""
    tmp = path + '.tmp'
    with open(tmp, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)

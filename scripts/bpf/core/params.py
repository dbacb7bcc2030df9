"""Parameter schemas for remote tools: declared once, checked the same way everywhere.

A tool declares ``PARAMS``, a list of plain dicts (a literal, so the controller and a
root-owned runner can read it without running the tool's code):

    {"name": "port", "type": "port", "multiple": True, "help": "..."}

Keys: ``name`` (the long option without dashes), ``type`` (see ``TYPES``), ``help``,
``default``, ``min``/``max`` (int, float, duration), ``choices`` (choice), ``multiple``
(repeatable, each value may be a comma-separated list; the result is a sorted list without
duplicates), ``metavar``, ``hidden`` (left out of ``--help``) and ``local`` (only for local
use, such as printing the generated C: never accepted through a runner).

The same functions parse the tool's own command line on the host, validate options in the
controller's CLI before anything is contacted, and write the tool's docs. Python 3.6.
"""

import argparse
import ipaddress
import re

TYPES = ("int", "float", "duration", "port", "addr", "ifname", "choice", "flag", "str", "path")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,15}$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class ParamError(ValueError):
    """A value that does not fit its parameter; the message names the option."""


def option(param):
    """``--name`` as typed on a command line."""
    return "--" + param["name"]


def convert(param, text):
    """One command-line word -> its value, or ParamError naming the option and the rule."""
    kind = param["type"]
    text = str(text).strip()
    flag = option(param)
    if kind == "port":
        if not text.isdigit() or not 0 < int(text) < 65536:
            raise ParamError("%s: '%s' is not a port number (1-65535)" % (flag, text))
        return int(text)
    if kind == "addr":
        try:
            return str(ipaddress.ip_address(text))
        except ValueError:
            raise ParamError("%s: '%s' is not an IPv4 or IPv6 address" % (flag, text)) from None
    if kind == "ifname":
        if not _IFNAME.match(text):
            raise ParamError("%s: '%s' is not an interface name" % (flag, text))
        return text
    if kind == "choice":
        if text not in param["choices"]:
            raise ParamError(
                "%s: '%s' is not one of %s" % (flag, text, ", ".join(param["choices"]))
            )
        return text
    if kind in ("str", "path"):
        if not text or "\x00" in text:
            raise ParamError("%s: empty value" % flag)
        return text
    if kind == "int":
        try:
            value = int(text)
        except ValueError:
            raise ParamError("%s: '%s' is not a whole number" % (flag, text)) from None
    elif kind == "float":
        try:
            value = float(text)
        except ValueError:
            raise ParamError("%s: '%s' is not a number" % (flag, text)) from None
    elif kind == "duration":
        m = _DURATION.match(text)
        if not m:
            raise ParamError("%s: '%s' is not a duration (e.g. 30, 30s, 5m, 500ms)" % (flag, text))
        value = float(m.group(1)) * _UNITS[m.group(2)]
    else:
        raise ParamError("%s: unknown parameter type %r" % (flag, kind))
    low, high = param.get("min"), param.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ParamError("%s: %s is out of range (%s)" % (flag, text, describe_range(param)))
    return value


def describe_range(param):
    low, high = param.get("min"), param.get("max")
    if low is not None and high is not None:
        return "%s-%s" % (low, high)
    if low is not None:
        return ">= %s" % low
    return "<= %s" % high


def convert_many(param, texts):
    """Values of a ``multiple`` parameter: each word may hold a comma-separated list."""
    values = set()
    for text in texts:
        for part in str(text).split(","):
            if part.strip():
                values.add(convert(param, part))
    return sorted(values)


def check_schema(params):
    """The schema itself is well formed (a tool's mistake, caught by tests)."""
    seen = set()
    for param in params:
        name, kind = param.get("name"), param.get("type")
        if not name or not re.match(r"^[a-z][a-z0-9-]*$", name) or name in seen:
            raise ValueError("bad or duplicate parameter name %r" % (name,))
        seen.add(name)
        if kind not in TYPES:
            raise ValueError("parameter %s: unknown type %r" % (name, kind))
        if kind == "choice" and not param.get("choices"):
            raise ValueError("parameter %s: choice without choices" % name)
        unknown = set(param) - {
            "name", "type", "help", "default", "min", "max", "choices", "multiple",
            "metavar", "hidden", "local",
        }  # fmt: skip
        if unknown:
            raise ValueError("parameter %s: unknown keys %s" % (name, sorted(unknown)))


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ParamError(message)


def _argparse_type(param):
    def parse(text):
        try:
            return convert(param, text)
        except ParamError as exc:
            raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None

    return parse


def build_parser(params, prog, description=None, epilog=None):
    """An argparse parser for the schema whose errors raise ParamError (never exit)."""
    check_schema(params)
    parser = _Parser(
        prog=prog,
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for param in params:
        kwargs = {"dest": param["name"].replace("-", "_")}
        helptext = argparse.SUPPRESS if param.get("hidden") else param.get("help", "")
        if param["type"] == "flag":
            parser.add_argument(option(param), action="store_true", help=helptext, **kwargs)
            continue
        kwargs["metavar"] = param.get("metavar") or param["name"].upper().replace("-", "_")
        if param.get("multiple"):
            kwargs.update(action="append", default=[])
        else:
            kwargs.update(type=_argparse_type(param), default=param.get("default"))
        parser.add_argument(option(param), help=helptext, **kwargs)
    return parser


def parse(params, argv, prog, description=None, epilog=None):
    """The tool's command line -> argparse Namespace; ParamError on any bad word."""
    parser = build_parser(params, prog, description, epilog)
    args = parser.parse_args(argv)
    for param in params:
        if param.get("multiple"):
            dest = param["name"].replace("-", "_")
            setattr(args, dest, convert_many(param, getattr(args, dest)))
    return args


def to_argv(params, values, allow_local=True):
    """Validated values (name -> value or list of values) -> the tool's argv.

    The controller calls this with what the user typed; it raises ParamError exactly
    like the tool would, so bad input is refused before any host is contacted.
    """
    by_name = {p["name"]: p for p in params}
    argv = []
    for name, value in values.items():
        param = by_name.get(name)
        if param is None:
            raise ParamError("--%s: not a parameter of this tool" % name)
        if param.get("local") and not allow_local:
            raise ParamError("%s: only for local use" % option(param))
        if value is None or value is False or value == [] or value == ():
            continue
        if param["type"] == "flag":
            argv.append(option(param))
        elif param.get("multiple"):
            items = value if isinstance(value, (list, tuple)) else [value]
            for item in convert_many(param, items):
                argv += [option(param), str(item)]
        else:
            argv += [option(param), str(value)]
            convert(param, value)
    return argv


def help_lines(params):
    """``Parameters:`` lines for a tool's header and docs (hidden ones left out)."""
    lines = []
    for param in params:
        if param.get("hidden"):
            continue
        word = option(param)
        if param["type"] != "flag":
            word += " " + (param.get("metavar") or param["name"].upper().replace("-", "_"))
        lines.append("  %-22s  %s" % (word, param.get("help", "")))
    return lines

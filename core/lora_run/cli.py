"""The `lora-run` command line: `lora-run COMMAND ...` runs a command a plugin adds (`register_commands`); `lora-run
RECIPE.toml ...` is `lora-run run RECIPE.toml ...` (the built-in `commands` plugin's). Exit codes: `errors.EXIT_*`."""
from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import re
import signal
import sys
import traceback
from typing import Any, NoReturn

from . import __version__, plugins as registry
from .errors import EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, LoraRunError, RecipeError
from .files import printable
from .recipe import did_you_mean


#: The output's reader went away, or its device is full or gone (a closed terminal): nothing more can be said there
_LOST = (errno.EPIPE, errno.ENOSPC, errno.EDQUOT, errno.EIO)


class ArgumentsError(RecipeError):
    """The command line is wrong: an argparse usage error, or a first word neither a command nor a file."""


class _Once(argparse._StoreAction):
    """A single-valued option: given twice it is refused (argparse would keep the last value silently)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: Any = None) -> None:
        given = namespace.__dict__.setdefault("_given", set())
        if self.option_strings and self.dest in given:
            raise argparse.ArgumentError(self, "given more than once; give it once")
        given.add(self.dest)
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """Every command's parser (plugins' commands too): usage errors are bad input, reported as every other (exit 2,
    JSON with --json), an argument left over in the command's name (`lora-run plugins: unrecognized arguments: extra`;
    argparse would name the whole program); a plain `add_argument` is a single-valued `_Once`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", None, _Once)
        self.register("action", "store", _Once)

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        parsed, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return parsed, extras

    def _print_message(self, message: str, file: Any = None) -> None:
        """Help, usage and version, flushed: a full device or a closed pipe raises here (argparse would hide it)."""
        stream = file or sys.stderr
        stream.write(message or ""), stream.flush()

    def error(self, message: str) -> NoReturn:
        with contextlib.suppress(OSError):   # the error's own exit code stands (``_fail``)
            self.print_usage(sys.stderr)
        raise ArgumentsError(f"{self.prog}: {message}")


def build_parser(plugins: registry.Plugins | None = None) -> argparse.ArgumentParser:
    parser = _Parser(prog="lora-run", description="Declarative identity-LoRA trainer for the model families its "
                     "plugins register (lora-run plugins).", epilog="Run a recipe: lora-run RECIPE.toml [options] "
                     "(see `lora-run run -h`).")
    parser.add_argument("--version", action="version", version=f"lora-run {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks (anywhere on the line)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    for name, reg in sorted((plugins or registry.load_plugins()).registry["command"].items()):
        p = sub.add_parser(name, help=reg.description or f"added by plugin {reg.plugin}")
        if reg.configure is not None:
            reg.configure(p)
    return parser


def _to_null(*streams: Any) -> None:
    """Their reader went away (`lora-run … | head`): what is still written to ``streams`` goes to the null device."""
    for stream in streams:
        with contextlib.suppress(OSError, ValueError, AttributeError):    # a test's capture has no descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _outlast(stream: Any) -> None:
    """A command that writes files (a run, `eval`, `demo`) goes on when the reader of ``stream`` goes away (`lora-run
    r.toml | head`) or its device is full or gone (``_LOST``), saying the rest to no one (the run's log keeps it)."""
    def guarded(method: Any) -> Any:
        def call(*args: Any) -> Any:
            try:
                return method(*args)
            except OSError as exc:
                if exc.errno not in _LOST:
                    raise
                _to_null(stream)
        return call
    stream.write, stream.flush = guarded(stream.write), guarded(stream.flush)


def _fail(err: LoraRunError, as_json: bool = False) -> int:
    try:    # the exit code stands also when the reader of the output has gone away, or its device is full or gone
        if as_json:
            print(json.dumps({"ok": False, "exit_code": err.exit_code, "error": type(err).__name__,
                              "problems": getattr(err, "problems", [str(err)])}, indent=2))
        else:
            for line in str(err).splitlines():
                print(f"error: {line}", file=sys.stderr)
        sys.stdout.flush(), sys.stderr.flush()
    except OSError as exc:
        if exc.errno not in _LOST:
            raise
        _to_null(sys.stdout, sys.stderr)
    return err.exit_code


def _lost(exc: OSError) -> int:
    """`lora-run … > /dev/full`: the machine's state, said as such (Python's flush at exit would fail again)."""
    _to_null(sys.stdout)
    return _fail(LoraRunError(f"writing the output failed: {exc.strerror} (is its disk or device full or gone?)"))


def warn_broken(plugins: Any) -> None:
    """Report the plugins that failed to load, once per command line."""
    if plugins.warned:
        return
    plugins.warned = True
    for b in plugins.broken:
        print(f"warning: plugin {b.name} is broken and was skipped: {b.error}", file=sys.stderr)
    for note in plugins.notes:
        print(f"warning: {note}", file=sys.stderr)


def _with_command(argv: list[str], commands: list[str]) -> list[str]:
    """``argv`` with the default command `run` before a recipe and its options; an unknown first word is named."""
    word = argv[0] if argv else "-h"
    paths = [a for a in argv if os.path.exists(a) or re.search(r"(?i)[/\\]|\.toml$", a)]    # a recipe, a folder
    if word in commands or (word.startswith("-") and word != "-" and (set(argv) & set(commands) or not paths)):
        return argv     # a command, or the program's own options (--help, --version) and no recipe
    if word.strip("- ") and not os.path.exists(word) and not re.search(r"(^-)|[/\\]|\.toml$", word, re.I):
        raise ArgumentsError(f'"{printable(word)}" is neither a command nor a recipe file'
                             f'{did_you_mean(word, commands, chr(34))}; commands: {", ".join(commands) or "none"} (a plugin\'s '
                             "command exists only while the plugin is installed and loads: lora-run plugins)")
    if "run" not in commands:
        raise ArgumentsError(f'no installed plugin adds the `run` command that trains "{printable(word)}" (the '
                             "built-in `commands` plugin does: lora-run plugins)")
    return ["run", *argv]


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None  # the `lora-run` program, not a call from Python (tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    for stream in (sys.stdout, sys.stderr):  # a name the terminal's encoding lacks is escaped, not a crash
        getattr(stream, "reconfigure", lambda **_: None)(errors="backslashreplace")
    debug = "--debug" in argv   # before or after the command (a subcommand's parser would drop the first's)
    argv = [a for a in argv if a != "--debug"]
    try:
        os.getcwd()
    except OSError as exc:   # the shell's folder was deleted: a relative path, or a recipe's default, cannot be found
        return _fail(ArgumentsError(f"the working folder cannot be read ({exc.strerror}; deleted while the shell was "
                                    "in it?); cd to a folder that exists"), "--json" in argv)
    plugins = registry.load_plugins()  # once per command line (the parser needs their commands)
    parser, commands = build_parser(plugins), plugins.registry["command"]
    try:
        args = parser.parse_args(_with_command(argv, sorted(commands)))
    except SystemExit as exc:  # --help, --version
        return EXIT_BAD_INPUT if exc.code not in (0, None) else EXIT_OK
    except OSError as exc:     # the help or the version written to a reader that went away, or a full device
        if exc.errno not in _LOST:
            raise
        return _lost(exc) if exc.errno != errno.EPIPE else _to_null(sys.stdout, sys.stderr) or EXIT_OK
    except ArgumentsError as err:
        warn_broken(plugins)   # a broken plugin's command is missing
        return _fail(err, "--json" in argv)
    if not args.command:
        with contextlib.suppress(OSError):
            parser.print_help()
        return EXIT_BAD_INPUT
    args.debug, as_json = debug, getattr(args, "json", False)
    read_only = commands[args.command].read_only
    if as_program and read_only and hasattr(signal, "SIGPIPE"):
        # `lora-run check … --json | head`: a reader that stops early ends us quietly, as it ends `cat`
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    elif as_program and not read_only:     # a command that writes files outlasts the reader of what it says
        _outlast(sys.stdout), _outlast(sys.stderr)
    try:    # a read-only command reports broken plugins itself (``warn_broken``); the others before they run
        if not read_only:
            warn_broken(plugins)
        return commands[args.command].factory(args, plugins)
    except BrokenPipeError:  # other commands: the reader went away; say nothing more on that pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except LoraRunError as err:
        if debug:    # the traceback, and the same exit code and message (JSON with --json) as without --debug
            traceback.print_exc()
        return _fail(err, as_json)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # noqa: BLE001 - no traceback reaches the user without --debug
        if debug:
            raise
        if isinstance(exc, OSError) and exc.errno in _LOST and not exc.filename:
            return _lost(exc)
        kind = "out of memory" if isinstance(exc, MemoryError) else f"unexpected {type(exc).__name__}"
        print(f"error: {kind}: {printable(str(exc))[:2000]} (a bug in lora-run or a plugin; --debug shows the "
              "traceback)", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

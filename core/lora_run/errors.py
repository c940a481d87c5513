"""One error family. Each names what failed; the CLI prints the message and exits with ``exit_code``."""
from __future__ import annotations

#: Exit codes are part of the CLI contract (automation depends on them).
EXIT_OK = 0
EXIT_FAILED = 1        # the run started and failed (backend error, NaN loss, crash of an external tool)
EXIT_BAD_INPUT = 2     # recipe, dataset, CLI arguments or output directory are wrong; nothing ran
EXIT_INTERRUPTED = 130  # Ctrl-C / SIGTERM: a resumable state was saved where possible


class LoraRunError(Exception):
    """Base class; ``str(err)`` is the whole user-facing message."""

    exit_code = EXIT_FAILED


class RecipeError(LoraRunError):
    """A recipe is wrong. Carries every problem found, each naming its file and key."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class DatasetError(LoraRunError):
    """The dataset has errors that must be fixed before any model loads."""

    exit_code = EXIT_BAD_INPUT


class PluginError(LoraRunError):
    """A plugin is missing, broken or used with options it does not accept."""

    exit_code = EXIT_BAD_INPUT


class OutputError(LoraRunError):
    """The output directory cannot be used as asked (not empty, not writable)."""

    exit_code = EXIT_BAD_INPUT


class BackendError(LoraRunError):
    """A backend failed while running (its message says what and where the logs are)."""


class TrainingInterrupted(LoraRunError):
    """Ctrl-C or SIGTERM arrived; a resumable state was saved."""

    exit_code = EXIT_INTERRUPTED

"""Plugin discovery (stevedore over the ``lora_run`` entry-point group) and the registries (pluggy).

Built-in plugins are found exactly like third-party ones. Nothing is loaded at import time: call
:func:`load_plugins`. Its environment switches (``LORA_RUN_PLUGINS_DISABLE``, ``_ONLY``, ``LORA_RUN_TRACE_PLUGINS``)
are described in docs/writing-a-plugin.md, "Debugging".
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Iterable

import attrs
import pluggy

from . import hookspecs
from .errors import PluginError
from .recipe import did_you_mean
from .schema import check_table, recipe_class

ENTRY_POINT_GROUP = "lora_run"
KINDS = ("family", "backend", "loss", "dataset", "evaluator", "embedder", "command", "section")


@attrs.frozen
class Registration:
    """One named thing a plugin registered. Every field is a keyword of ``register(...)``, each kind's described on
    its hook's page (docs/hooks/register_<kind>s.md); an unknown keyword is an error that marks the plugin broken
    (no untyped side channel)."""

    kind: str
    name: str
    factory: Callable[..., Any] | None   # None for families (a family is facts, not a factory)
    plugin: str
    options: type | None = None
    # backends:
    capabilities: dict[str, frozenset[str]] = attrs.field(factory=dict)  # family -> features (``loss:*``: every loss)
    description: str = ""                                       # any kind: one line (a command's is its help)
    reasons: dict[str, Any] = attrs.field(factory=dict)     # feature (or family -> feature) -> why it is not honoured
    family_notes: dict[str, str] = attrs.field(factory=dict)    # family -> why it is not trained
    alias_of: str | None = None                                 # the backend this name is another name for
    memory_estimate: Callable[..., Any] | None = None           # lent to backends without their own memory model
    generate: Callable[..., Any] | None = None                  # image generation, lent to evaluator plugins
    # commands:
    configure: Callable[..., Any] | None = None                 # ``configure(parser)`` adds the arguments
    read_only: bool = False                                     # only reads and prints; reports broken plugins itself
    # families (read by the ``training`` plugin and each backend, never by core but for the defaults):
    file_slots: dict[str, str] = attrs.field(factory=dict)      # ``[model.files]`` slot -> what file goes there
    pixel_multiple: int = 16                                    # every bucket side is a multiple of it (latent grid)
    versions: tuple[str, ...] = ()                              # what ``[model] version`` may name (empty: nothing)
    adapters: dict[str, Any] = attrs.field(factory=dict)        # backend -> ``"module:Class"`` teaching it the family
    samplers: tuple[str, ...] = ()                              # its own σ samplers (``[train] timestep_sampling``)
    lora_formats: tuple[str, ...] = ()                          # what ``[output] formats`` may name
    default_formats: tuple[str, ...] = ()                       # written without ``formats`` (empty: every one)
    #: families, backends, embedders: chosen when the recipe leaves the name unset (a backend: among those
    #: that train the recipe's family)
    default: bool = False
    # sections:
    check: Callable[..., Any] | None = None                     # ``check(recipe, plugins, problems)``: its rules
    with_defaults: Callable[..., Any] | None = None             # ``with_defaults(section, plugins) -> section``


_FIELDS = frozenset(f.name for f in attrs.fields(Registration)) - {
    "kind", "name", "factory", "plugin", "options", "capabilities"}


@attrs.frozen
class BrokenPlugin:
    name: str
    error: str


class Plugins:
    """The loaded plugin manager plus everything registered through it."""

    def __init__(self, pm: pluggy.PluginManager, broken: list[BrokenPlugin]):
        self.pm = pm
        self.hook = pm.hook
        self.broken = broken
        self.conflicts: list[str] = []
        self.warned = False     # the command line has reported the broken plugins
        self.notes: list[str] = []   # the environment's plugin switches naming no installed plugin
        self.registry: dict[str, dict[str, Registration]] = {kind: {} for kind in KINDS}
        self._collect("family", "register_families")
        self._collect("backend", "register_backends", families=dict(self.registry["family"]))
        for kind, hook_name in (("loss", "register_losses"), ("dataset", "register_datasets"),
                                ("evaluator", "register_evaluators"), ("command", "register_commands"),
                                ("section", "register_sections")):
            self._collect(kind, hook_name)

    @property
    def recipe_class(self) -> type:
        """The recipe schema with the sections the plugins register (:func:`lora_run.schema.recipe_class`)."""
        return recipe_class((name, reg.options) for name, reg in self.registry["section"].items())

    def _collect(self, kind: str, hook_name: str, **arguments: Any) -> None:
        """Call ``hook_name`` through pluggy once per implementing plugin (so tracing and monitoring see
        every call) with a ``register`` that knows which plugin registers."""
        impls = getattr(self.hook, hook_name).get_hookimpls()
        for impl in impls:
            plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)

            def register(name: str, factory: Callable[..., Any] | None = None, *, options: type | None = None,
                         capabilities: dict[str, Iterable[str]] | None = None, kind: str = kind,
                         _plugin: str = plugin_name, **fields: Any) -> None:
                if kind not in KINDS:
                    raise PluginError(f"plugin {_plugin}: unknown registration kind {kind!r}")
                unknown = sorted(set(fields) - _FIELDS)
                if unknown:
                    raise TypeError(f"register() got unknown keyword(s) {', '.join(unknown)}; known: "
                                    f"{', '.join(sorted(_FIELDS | {'options', 'capabilities', 'kind'}))}")
                if kind == "section":
                    check_table(name, options)
                table = self.registry[kind]
                if name in table:
                    self.conflicts.append(f"{kind} {name!r} from plugin {_plugin} ignored: already registered "
                                          f"by {table[name].plugin}")
                    return
                caps = {family: frozenset(features) for family, features in (capabilities or {}).items()}
                table[name] = Registration(kind, name, factory, _plugin, options, caps, **fields)

            others = [other.plugin for other in impls if other.plugin is not impl.plugin]
            try:
                self.pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register, **arguments)
            except Exception as exc:  # noqa: BLE001 - a broken plugin is reported, never fatal
                self.broken.append(BrokenPlugin(plugin_name, f"{hook_name} failed: {type(exc).__name__}: {exc}"))

    def names(self, kind: str) -> list[str]:
        return sorted(self.registry[kind])

    def get(self, kind: str, name: str, where: str) -> Registration:
        """Look a registration up by name; the error names the recipe key and the choices."""
        if name not in self.registry[kind]:
            raise PluginError(self._unknown(kind, name, f" at [{where}]"))
        return self.registry[kind][name]

    def find(self, kind: str, name: str, where: tuple, problems: Any) -> Registration | None:
        """Look a registration up by name; None with the problem (``get``'s error) added at the key ``where``."""
        if name not in self.registry[kind]:
            problems.add(where, self._unknown(kind, name))
        return self.registry[kind].get(name)

    def _unknown(self, kind: str, name: str, at: str = "") -> str:
        table, hint = self.registry[kind], did_you_mean(name, self.registry[kind], '"')
        broken = [b for b in self.broken if b.name == name]
        extra = f"; plugin {name!r} is installed but broken: {broken[0].error}" if broken else ""
        return f"unknown {kind} \"{name}\"{at}{hint}; available: {', '.join(sorted(table)) or 'none installed'}{extra}"

    def default(self, kind: str, among: Iterable[str] | None = None) -> str | None:
        """The name a recipe that leaves ``kind`` unset gets: the registration marked ``default`` (among
        ``among`` when given), else the only candidate; None when that does not decide (none, or several
        marked)."""
        table = self.registry[kind]
        names = sorted(table) if among is None else [n for n in among if n in table]
        marked = [n for n in names if table[n].default]
        return marked[0] if len(marked) == 1 else names[0] if len(names) == 1 and not marked else None

    def trainers(self, family: str) -> list[str]:
        """Backends that train ``family`` (another name of a listed backend is left out)."""
        backends = self.registry["backend"]
        return sorted(n for n, r in backends.items() if family in r.capabilities and r.alias_of not in backends)


def _split_env(name: str) -> set[str]:
    return {part.strip() for part in os.environ.get(name, "").split(",") if part.strip()}


def load_plugins(extra: Iterable[Any] = ()) -> Plugins:
    """Discover entry points with stevedore, register them with pluggy, collect the registries; ``extra`` objects
    (tests, embedding applications) are registered after the entry points."""
    from importlib.metadata import entry_points

    from stevedore import NamedExtensionManager

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    broken: list[BrokenPlugin] = []
    disabled, only = _split_env("LORA_RUN_PLUGINS_DISABLE"), _split_env("LORA_RUN_PLUGINS_ONLY")
    installed = {ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)}

    def failed(_manager: Any, entrypoint: Any, exc: BaseException) -> None:
        broken.append(BrokenPlugin(entrypoint.name, f"{type(exc).__name__}: {exc}"))

    # a skipped plugin is never imported (its import may be what is broken)
    manager = NamedExtensionManager(ENTRY_POINT_GROUP, sorted((only or installed) - disabled), invoke_on_load=False,
                                    on_load_failure_callback=failed, on_missing_entrypoints_callback=None)
    for ext in sorted(manager, key=lambda e: e.name):
        try:
            pm.register(ext.plugin, name=ext.name)
        except Exception as exc:  # noqa: BLE001 - e.g. a hook with wrong arguments
            broken.append(BrokenPlugin(ext.name, f"{type(exc).__name__}: {exc}"))
    for obj in extra:
        pm.register(obj)
    while True:  # a plugin implementing a hook that does not exist (a typo) is reported and dropped
        try:
            pm.check_pending()
            break
        except pluggy.PluginValidationError as exc:
            name = pm.get_name(exc.plugin) or repr(exc.plugin)
            broken.append(BrokenPlugin(name, f"unknown hook implementation: {exc}"))
            pm.unregister(exc.plugin)
    if os.environ.get("LORA_RUN_TRACE_PLUGINS"):
        def before(hook_name: str, _impls: Any, kwargs: dict) -> None:
            print(f"[lora-run trace] {hook_name}({', '.join(sorted(kwargs))})", file=sys.stderr)

        def after(outcome: Any, hook_name: str, _impls: Any, _kwargs: dict) -> None:
            print(f"[lora-run trace] {hook_name} -> {outcome.get_result()!r}"[:300], file=sys.stderr)
        pm.add_hookcall_monitoring(before, after)
    plugins = Plugins(pm, broken)
    plugins.notes = [f"{var} names {', '.join(sorted(names - installed))}, which no installed plugin is (installed: "
                     f"{', '.join(sorted(installed))})" for var, names in (("LORA_RUN_PLUGINS_ONLY", only),
                                                                      ("LORA_RUN_PLUGINS_DISABLE", disabled))
                     if names - installed]
    return plugins

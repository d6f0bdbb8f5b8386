"""The Mindset workbench: a keyboard-driven Textual app over the engine.

The app gets an :class:`engine.facade.Engine` in its constructor and hands each pane the part
of it the pane needs (see :mod:`mindset.protocols`); everything goes through the engine's
public, awaitable methods. The first frame is drawn before torch or any model is
imported: the model loads in a worker while the status bar says so. Only the first tab's pane
is built before the first frame; the other panes (and their modules) follow right after it.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Awaitable, Callable
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.message import Message
from textual.theme import Theme
from textual.widget import Widget
from textual.widgets import Footer, Header, TabbedContent, TabPane

from engine.errors import MindsetError
from engine.facade import STUDENT, TEACHER, Engine
from engine.views import short_spec
from mindset.config import (
    WorkbenchConfig,
    load_config,
    read_theme_files,
    save_theme,
    screenshot_dir,
)
from mindset.screens.help import HelpScreen, key_label
from mindset.screens.messages import OpenMemoryEntry
from mindset.screens.quick_start import QuickStartScreen
from mindset.widgets.commands import WorkbenchCommands
from mindset.widgets.messages import JobsChanged, ModelLoaded, ModelLoadFailed
from mindset.widgets.status_bar import StatusBar

if TYPE_CHECKING:
    from engine.services.jobs import WorkEstimate

DEFAULT_THEME = "mindset-dusk"

# Tab id -> (section name, module, pane class); the order is the order of the tabs. The
# modules are imported when the pane is built: the hidden tabs' cost comes after the
# first frame.
PANES: dict[str, tuple[str, str, str]] = {
    "memory": ("Memory", "mindset.widgets.memory_pane", "MemoryPane"),
    "model": ("Model", "mindset.widgets.model_pane", "ModelPane"),
    "training": ("Training", "mindset.widgets.training_pane", "TrainingPane"),
    "chat": ("Chat", "mindset.widgets.chat_pane", "ChatPane"),
}
# Tab id -> the part of the engine its pane talks to (a protocol of mindset.protocols).
PANE_APIS: dict[str, Callable[[Engine], object]] = {
    "memory": lambda engine: engine.memory,
    "model": lambda engine: engine,
    "training": lambda engine: engine.jobs,
    "chat": lambda engine: engine.chat,
}
# Tab id -> further engine parts its pane takes as keyword arguments.
PANE_EXTRAS: dict[str, Callable[[Engine], dict[str, object]]] = {
    "chat": lambda engine: {"agent": engine.agent, "knowledge": engine.knowledge},
    "model": lambda engine: {"surgery": engine.surgery},
}
FIRST_TAB = "memory"
PANE_WAIT_TRIES = 500  # x 20 ms: how long a palette action waits for its pane to be built


def pane_class(tab_id: str) -> type[Widget]:
    """The pane class of a tab (importing its module on first use)."""
    _, module, name = PANES[tab_id]
    found: type[Widget] = getattr(importlib.import_module(module), name)
    return found

# The widget that gets the focus when a tab is shown.
FOCUS_TARGETS = {
    "memory": "#memory-rows",
    "model": "#teacher-tree",
    "training": "#jobs-table",
    "chat": "#chat-input",
}


class MindsetApp(App[None]):
    """The workbench."""

    TITLE = "Mindset"
    CSS_PATH = "app.tcss"
    COMMANDS: ClassVar = App.COMMANDS | {WorkbenchCommands}
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("f1", "help", "Help", id="app.help"),
        Binding("f2", "show_tab('memory')", "Memory", id="tab.memory"),
        Binding("f3", "show_tab('model')", "Model", id="tab.model"),
        Binding("f4", "show_tab('training')", "Training", id="tab.training"),
        Binding("f5", "show_tab('chat')", "Chat", id="tab.chat"),
        Binding("ctrl+t", "change_theme", "Theme", id="app.theme"),
        Binding("f9", "quick_start", "Quick start", id="app.quick_start"),
        Binding("ctrl+q", "quit", "Quit", id="app.quit", priority=True),
    ]

    def __init__(
        self,
        engine: Engine,
        *,
        config: WorkbenchConfig | None = None,
        load_models: bool = True,
        offer_quick_start: bool = True,
    ) -> None:
        super().__init__()
        self.engine = engine
        self.workbench_config = config if config is not None else _safe_config()
        self.load_models_on_start = load_models
        self.offer_quick_start = offer_quick_start
        self._config_error: str | None = getattr(self.workbench_config, "error", None)
        for definition in read_theme_files():
            self.register_theme(Theme(**definition))  # type: ignore[arg-type]
        wanted = self.workbench_config.theme or DEFAULT_THEME
        self.theme = wanted if wanted in self.available_themes else DEFAULT_THEME
        if self.workbench_config.keymap:
            self.set_keymap(self.workbench_config.keymap)

    # ------------------------------------------------------------------------------ layout

    def compose(self) -> ComposeResult:
        yield Header(show_clock=False, icon="◆")
        with TabbedContent(id="tabs", initial=FIRST_TAB):
            for tab_id, (title, _, _) in PANES.items():
                with TabPane(title, id=tab_id):
                    if tab_id == FIRST_TAB:
                        yield self._new_pane(tab_id, pane_class(tab_id))
        yield StatusBar(id="status")
        yield Footer()

    def _new_pane(self, tab_id: str, cls: type[Widget]) -> Widget:
        factory: Any = cls  # every pane takes (its part of the engine, id=...)
        extras = PANE_EXTRAS[tab_id](self.engine) if tab_id in PANE_EXTRAS else {}
        pane: Widget = factory(PANE_APIS[tab_id](self.engine), id=f"{tab_id}-pane", **extras)
        return pane

    async def _build_hidden_panes(self) -> None:
        """The panes of the tabs not shown at start, built once the first frame is out."""
        for tab_id in PANES:
            if tab_id == FIRST_TAB:
                continue
            cls = await asyncio.to_thread(pane_class, tab_id)  # the import, off the loop
            if not self.screen_stack:
                return  # closing
            with suppress(NoMatches):
                await self._main(f"TabPane#{tab_id}", TabPane).mount(self._new_pane(tab_id, cls))

    def on_mount(self) -> None:
        self._focus_pane(FIRST_TAB)
        self.call_after_refresh(
            lambda: self.run_worker(self._build_hidden_panes(), group="panes",
                                    exit_on_error=False)
        )
        status = self._main(StatusBar)
        status.database = Path(self.engine.database).name
        status.model_text = f"model: {self.engine.model_spec} (loading…)"
        self.theme_changed_signal.subscribe(self, self._remember_theme)
        if self._config_error:
            self.notify(self._config_error, severity="error", timeout=10)
        # Heavy imports (torch) start only once the first frame is on screen.
        if self.load_models_on_start:
            self.call_after_refresh(self.load_models)
        else:
            status.model_text = f"model: {self.engine.model_spec} (not loaded)"
        if self.engine.student_spec is None:
            self.call_after_refresh(self.find_student)

    # ------------------------------------------------------------------------------ models

    @work(exclusive=True, exit_on_error=False, group="models")
    async def load_models(self) -> None:
        """Load the teacher (and a student, if there is one) without blocking the UI."""
        roles = [TEACHER] + ([STUDENT] if self.engine.student_spec else [])
        for role in roles:
            try:
                await self.engine.load_model(role)
            except MindsetError as exc:
                self.post_message(ModelLoadFailed(role, str(exc)))
            else:
                self.post_message(ModelLoaded(role))

    @work(group="student", exit_on_error=False)
    async def find_student(self) -> None:
        """Use the newest finished student; on a first run, offer the quick start."""
        directory = None
        if self.engine.availability()["jobs"].ok:
            try:
                directory = await self.engine.jobs.latest_student()
            except MindsetError:
                directory = None
        if directory is not None:
            self.adopt_student(directory)
        elif self.offer_quick_start:
            self.action_quick_start()

    @work(group="student", exit_on_error=False)
    async def adopt_student(self, directory: str) -> None:
        """Load a student (a finished job's) and show it in every pane."""
        if directory == self.engine.student_spec:
            return  # already this workbench's student (a followed job reports "done" again)
        try:
            await self.engine.adopt_student(directory)
        except MindsetError as exc:
            self.post_message(ModelLoadFailed(STUDENT, str(exc)))
        else:
            self.post_message(ModelLoaded(STUDENT))

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        loaded = self.engine.model(message.role)
        if message.role == TEACHER and loaded is not None:
            with suppress(NoMatches):  # the app may be closing
                self._main(StatusBar).model_text = f"model: {short_spec(loaded.spec)}"
        self._post_to_panes(lambda: ModelLoaded(message.role))

    @on(ModelLoadFailed)
    def _model_failed(self, message: ModelLoadFailed) -> None:
        spec = self.engine.spec_for(message.role)
        with suppress(NoMatches):
            self._main(StatusBar).model_text = f"model: {spec} (failed)"
        self.notify(message.error, title=f"{message.role} model not loaded", severity="error",
                    timeout=12)
        self._post_to_panes(lambda: ModelLoadFailed(message.role, message.error))

    @on(OpenMemoryEntry)
    async def _open_memory_entry(self, message: OpenMemoryEntry) -> None:
        """Show one memory entry in the Memory pane (from the trace screen)."""
        self.action_show_tab("memory")
        (await self._pane("memory")).show_entry(message.table, message.entry_id)

    @on(JobsChanged)
    def _jobs_changed(self, message: JobsChanged) -> None:
        with suppress(NoMatches):
            self._main(StatusBar).running_jobs = message.running

    # ----------------------------------------------------------------------------- actions

    def _main(self, selector: Any, expect_type: Any = None) -> Any:
        """A widget of the main screen, whichever modal screen is on top of it."""
        if not self.screen_stack:
            raise NoMatches("the app has no screen (it is closing)")
        screen = self.screen_stack[0]
        if expect_type is None:
            return screen.query_one(selector)
        return screen.query_one(selector, expect_type)

    def _post_to_panes(self, message_factory: Callable[[], Message]) -> None:
        if not self.screen_stack:
            return
        screen = self.screen_stack[0]
        for pane_id in PANES:
            for pane in screen.query(f"#{pane_id}-pane"):
                # A pane still being built reads the models' state when it mounts.
                if pane.is_mounted:
                    pane.post_message(message_factory())

    def action_show_tab(self, tab_id: str) -> None:
        self._main(TabbedContent).active = tab_id
        self._focus_pane(tab_id)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        # Events can arrive late: only the tab that is still active takes the focus.
        if event.pane.id and event.pane.id == event.tabbed_content.active:
            self._focus_pane(event.pane.id)

    def _focus_pane(self, tab_id: str, attempts: int = 20) -> None:
        """Put the focus on the pane's main widget, so that its keys work at once
        (a lazily mounted pane may need a moment to appear)."""
        selector = FOCUS_TARGETS.get(tab_id)
        if not selector:
            return
        try:
            if self._main(TabbedContent).active != tab_id:
                return  # the user moved on meanwhile
            self._main(selector).focus()
        except NoMatches:
            if attempts > 0 and self.screen_stack:
                self.set_timer(0.05, lambda: self._focus_pane(tab_id, attempts - 1))

    async def _pane(self, tab_id: str) -> Any:
        """The pane of a tab, once it is mounted with its children (the hidden tabs' panes
        are built after the first frame, and a slow machine may still be composing one)."""
        for _ in range(PANE_WAIT_TRIES):
            with suppress(NoMatches):
                pane = self._main(f"#{tab_id}-pane")
                if pane.is_mounted:
                    return pane
            await asyncio.sleep(0.02)
        return self._main(f"#{tab_id}-pane")

    def deliver_screenshot(self, filename: str | None = None, path: str | None = None,
                           time_format: str | None = None) -> str | None:
        """Screenshots go to ~/Downloads when it exists, else to the data directory's
        ``screenshots`` folder (Textual's default fails where there is no Downloads)."""
        if path is None:
            path = str(screenshot_dir())
        key = super().deliver_screenshot(filename, path, time_format)
        self.notify(f"screenshot saved in {path}", title="screenshot")
        return key

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.binding_sections(), self._keymap))

    def action_quick_start(self) -> None:
        jobs = self.engine.jobs
        estimate = None
        if self.engine.availability()["jobs"].ok and self.load_models_on_start:
            def estimate() -> Awaitable[WorkEstimate]:
                return jobs.estimate_request(jobs.quick_start_request())
        self.push_screen(QuickStartScreen(estimate, jobs.quick_start_result),
                         self._quick_start_answer)

    def _quick_start_answer(self, start: bool | None) -> None:
        if start:
            self.action_show_tab("training")
            self.run_worker(self._start_quick_start(), exit_on_error=False)

    async def _start_quick_start(self) -> None:
        (await self._pane("training")).start_quick_start()

    def _remember_theme(self, theme: Theme) -> None:
        try:
            save_theme(theme.name)
        except (MindsetError, OSError) as exc:
            self.notify(f"could not remember the theme: {exc}", severity="warning")

    # ------------------------------------------------------------------- palette and help

    def binding_sections(self) -> list[tuple[str, list[Binding]]]:
        """Every binding with an id, grouped by where it acts."""
        sections: list[tuple[str, list[Binding]]] = [("App", _bindings(type(self)))]
        for tab_id, (title, _, _) in PANES.items():
            sections.append((title, _bindings(pane_class(tab_id))))
        return sections

    def key_for(self, binding: Binding) -> str:
        return key_label(binding, self._keymap)

    async def run_section_action(self, section: str, action: str) -> None:
        """Run a binding's action where it belongs (the palette's callback)."""
        if section == "App":
            await self.run_action(action)
            return
        for tab_id, (title, _, _) in PANES.items():
            if title == section:
                self.action_show_tab(tab_id)
                await (await self._pane(tab_id)).run_action(action)
                return

    async def on_unmount(self) -> None:
        await self.engine.close()


def _bindings(owner: type) -> list[Binding]:
    found: list[Binding] = []
    for item in getattr(owner, "BINDINGS", []):
        if isinstance(item, Binding) and item.id:
            found.append(item)
    return found


class _ConfigWithError(WorkbenchConfig):
    error: str | None = None


def _safe_config() -> WorkbenchConfig:
    """The config file's settings; a broken file gives defaults and a notification."""
    try:
        return load_config()
    except MindsetError as exc:
        config = _ConfigWithError()
        config.error = f"{exc}; using default keys and theme"
        return config


def run_app(model_spec: str = "default", *, student_spec: str | None = None,
            database: str | None = None) -> None:
    """Open the workbench in the terminal (``mindset`` with no command)."""
    engine = Engine(model_spec, student_spec=student_spec, database=database)
    MindsetApp(engine).run()

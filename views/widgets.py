"""Small HTML blocks shared by the tabs (styled by assets/style.css, colours from the theme)."""

from __future__ import annotations

import contextlib
import html


def tile(value: str, label: str) -> str:
    """One number with its label; both are escaped."""
    return (
        f'<div class="moe-tile"><div class="moe-num">{html.escape(value)}</div>'
        f'<div class="moe-lbl">{html.escape(label)}</div></div>'
    )


def card(title_html: str, tiles: list[str], footer_html: str = "") -> str:
    """A bordered card: a title line, a grid of tiles, then an optional footer (already safe HTML)."""
    return (
        f'<div class="moe-card"><div class="moe-card-title">{title_html}</div>'
        f'<div class="moe-tiles">{"".join(tiles)}</div>{footer_html}</div>'
    )


def empty(message_html: str) -> str:
    return f'<div class="moe-empty">{message_html}</div>'


# Heavy jobs (model loads, profiling, conversion, sweeps, evaluation, export) share one queue slot per
# machine: a 2-core CPU has no room for two, and a GPU holds one model copy at a time.
HEAVY = {"concurrency_id": "heavy", "concurrency_limit": 1}
LIGHT = {"concurrency_limit": None, "show_progress": "hidden"}


def guarded(title: str, outputs: int = 1):
    """Wrap a handler (a function or a generator) so that every failure reaches the user as a message, never
    as a stack trace.

    ValueError / OSError carry the library's what-and-how-to-fix text; Cancelled becomes a warning and leaves
    every output as it was; anything else is logged on the server and reported in one line.
    """
    import functools
    import inspect

    def wrap(fn):
        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def streaming(*args, **kwargs):
                with _messages(title, outputs) as skipped:
                    yield from fn(*args, **kwargs)
                if skipped:
                    yield skipped[0]

            return streaming

        @functools.wraps(fn)
        def handler(*args, **kwargs):
            with _messages(title, outputs) as skipped:
                return fn(*args, **kwargs)
            return skipped[0]

        return handler

    return wrap


@contextlib.contextmanager
def _messages(title: str, outputs: int):
    """Turn what the block raises into a gr.Error; on Cancelled, warn and put the skip outputs in the list."""
    import logging

    import gradio as gr

    from moe_core.profiling import Cancelled

    skipped = []
    try:
        yield skipped
    except gr.Error:
        raise
    except Cancelled:
        gr.Warning(f"{title}: cancelled. Nothing was changed.")
        skipped.append(gr.skip() if outputs == 1 else (gr.skip(),) * outputs)
    except (ValueError, OSError, KeyError) as exc:
        message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
        raise gr.Error(message, title=title, print_exception=False) from None
    except Exception as exc:  # a bug: keep serving, say what happened, keep the trace in the log
        logging.getLogger("moe_studio").exception("%s failed", title)
        message = f"{type(exc).__name__}: {exc}. The app is still running; the details are in the server log."
        raise gr.Error(message, title=title, print_exception=False) from None


def while_running(update, fn, *args, every: float = 0.5, **kwargs):
    """Run ``fn(*args, **kwargs)`` in a worker thread, yielding ``update()`` every ``every`` seconds until it
    ends; returns its result (or raises its exception), so a generator handler can stream a log with
    ``result = yield from while_running(...)``. The thread runs in this request's context, so gr.Progress
    calls from it still reach the browser."""
    import concurrent.futures
    import contextvars

    context = contextvars.copy_context()
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moe-job") as pool:
        future = pool.submit(context.run, fn, *args, **kwargs)
        while True:
            try:
                return future.result(timeout=every)
            except concurrent.futures.TimeoutError:
                yield update()


def table(headers: list[str], rows: list[list[str]]) -> str:
    """A small HTML table (cells escaped)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f'<table class="moe-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def millions(n: float) -> str:
    return f"{n / 1e6:,.2f} M" if n >= 1e5 else f"{n / 1e3:,.1f} k"


def problem(title: str, message: str) -> str:
    """A card that explains why something cannot run (shown in place of a result)."""
    return f'<div class="moe-problem"><b>{html.escape(title)}</b><br>{html.escape(message)}</div>'


def layout_text(run: dict) -> str:
    """The layout a run config converted to, in one phrase (its method's registry entry says how)."""
    from moe_core.methods import METHODS

    method = run.get("method", "")
    section = run.get(method) or {}
    return METHODS[method].layout_text(section) if method in METHODS else "?"


def converted_status(session, no_moe: str, ready: str) -> str:
    """The grey line on top of a tab that works on the converted model: what this session has now.

    no_moe: what to do when nothing is converted yet; ready: what this tab does with the converted model.
    """
    from moe_core.methods import METHODS

    if session.moe is None:
        if session.dense is None:
            return no_moe
        return f"Model **{session.dense.spec}** is loaded, not converted yet. {no_moe}"
    run = session.run_config or {}
    method = run.get("method", "moe")
    title = METHODS[method].title if method in METHODS else method
    plan = ", with a per-layer routing plan" if run.get("plan") else ""
    spec = session.dense.spec if session.dense is not None else "?"
    return f"Converted: **{title} {layout_text(run)}** of **{spec}**{plan}. {ready}"

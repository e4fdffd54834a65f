"""Notification templates: compile check, locale choice, sandboxed rendering. Pure, no I/O.

``PUT /v1/templates/{name}`` calls ``check_template`` (a template that does not compile is a
422 naming ``locales.<tag>.<field>``); the notify fan-out calls ``choose_locale`` and
``render`` per recipient. Rendering uses Jinja2's ``SandboxedEnvironment`` (no access to
unsafe attributes, no I/O) with ``StrictUndefined``: a variable the event does not carry is
a ``RenderError`` (the delivery is dead-lettered with reason ``render_error``) rather than a
silently blank text; ``{{ data.name | default("there") }}`` and ``is defined`` tests stay
available. Output is plain text (no HTML autoescape): it goes to push, SMS and email bodies.

Variables: ``data`` (the event's ``notify.data``), ``event`` (``event_id``, ``author_id``,
``kind``, ``payload``) and ``user_id`` (the recipient).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import jinja2
import msgspec
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

from feedsvc.errors import RenderError, Unprocessable

DEFAULT_LOCALE = "en"
FIELDS = ("title", "body")
MAX_SOURCE_CHARS = 4096  # per field, as stored
MAX_OUTPUT_CHARS = 8192  # per rendered field: a template cannot blow up a message
_COMPILED_CACHE = 2048  # compiled sources kept per process



class _BoundedEnvironment(SandboxedEnvironment):
    """The sandbox, plus bounds on the two operators that can allocate without limit
    (``"x" * 10**9``, ``9 ** 9 ** 9``): a template's output stays small."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > 64:
            raise SecurityError("exponent too large")
        if operator == "*" and any(
            isinstance(a, (str, list, tuple)) and isinstance(b, int) and b > MAX_OUTPUT_CHARS
            for a, b in ((left, right), (right, left))
        ):
            raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


_ENV = _BoundedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False)


class LocaleText(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    title: str
    body: str


class Template(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A stored template: text per BCP 47 locale tag; ``en`` is required."""

    locales: dict[str, LocaleText]


class EventVars(msgspec.Struct, frozen=True):
    """What a template sees as ``event``."""

    event_id: str
    author_id: str
    kind: str
    payload: dict[str, Any]


class Rendered(msgspec.Struct, frozen=True):
    title: str
    body: str
    locale: str  # the locale whose text was used


@functools.lru_cache(maxsize=_COMPILED_CACHE)
def _compile(source: str) -> jinja2.Template:
    return _ENV.from_string(source)


def check_template(template: Template) -> None:
    """Raise Unprocessable naming the first locale/field that is missing, too long or does
    not compile. Called before a template is stored."""
    if DEFAULT_LOCALE not in template.locales:
        raise Unprocessable("a template needs an 'en' locale", code="missing_locale",
                            field="locales.en")
    for tag, text in template.locales.items():
        if not _valid_tag(tag):
            raise Unprocessable(f"{tag!r} is not a BCP 47 language tag",
                                code="invalid_locale", field=f"locales.{tag}")
        for name in FIELDS:
            source: str = getattr(text, name)
            field = f"locales.{tag}.{name}"
            if len(source) > MAX_SOURCE_CHARS:
                raise Unprocessable(f"{field} is longer than {MAX_SOURCE_CHARS} characters",
                                    code="template_too_long", field=field)
            try:
                _compile(source)
            except jinja2.TemplateSyntaxError as exc:
                raise Unprocessable(f"{field} does not compile: line {exc.lineno}: "
                                    f"{exc.message}", code="invalid_template",
                                    field=field) from exc
            except (RecursionError, MemoryError, ValueError) as exc:  # absurd nesting, ...
                raise Unprocessable(f"{field} does not compile: {type(exc).__name__}",
                                    code="invalid_template", field=field) from exc


def _valid_tag(tag: str) -> bool:
    parts = tag.split("-")
    return (bool(parts[0]) and parts[0].isalpha() and 2 <= len(parts[0]) <= 8
            and all(p.isalnum() and 1 <= len(p) <= 8 for p in parts[1:]))


def choose_locale(available: Iterable[str], wanted: str | None) -> str:
    """The exact tag (case-insensitive), then its language (``fr-CA`` → ``fr``), then
    ``en``."""
    by_lower = {tag.lower(): tag for tag in available}
    if wanted:
        lowered = wanted.lower()
        if lowered in by_lower:
            return by_lower[lowered]
        language = lowered.split("-", 1)[0]
        if language in by_lower:
            return by_lower[language]
    return by_lower.get(DEFAULT_LOCALE, DEFAULT_LOCALE)


def render(name: str, template: Template, locale: str | None, *, data: Mapping[str, Any],
           event: EventVars, user_id: str) -> Rendered:
    """Title and body for one recipient in their locale. Raises RenderError (reason
    ``render_error``) when the template fails for these values."""
    tag = choose_locale(template.locales, locale)
    text = template.locales.get(tag)
    if text is None:
        raise RenderError(name, tag, "locales", "no 'en' text to fall back on")
    variables = {"data": dict(data), "event": msgspec.structs.asdict(event),
                 "user_id": user_id}
    out: dict[str, str] = {}
    for field in FIELDS:
        source: str = getattr(text, field)
        try:
            value = _compile(source).render(variables)
        except jinja2.TemplateSyntaxError as exc:  # stored before the compile check existed
            raise RenderError(name, tag, field, f"does not compile: {exc.message}") from exc
        except Exception as exc:  # a template may raise anything its expressions do
            raise RenderError(name, tag, field, f"{type(exc).__name__}: {exc}") from exc
        if len(value) > MAX_OUTPUT_CHARS:
            raise RenderError(name, tag, field, f"renders to more than {MAX_OUTPUT_CHARS} "
                              "characters")
        out[field] = value
    return Rendered(out["title"], out["body"], tag)

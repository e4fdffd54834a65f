"""Templates: compile check, locale choice, sandboxed rendering (pure, no servers)."""

from __future__ import annotations

import pytest

from feedsvc.delivery.templates import (
    MAX_OUTPUT_CHARS,
    EventVars,
    LocaleText,
    Template,
    check_template,
    choose_locale,
    render,
)
from feedsvc.errors import PermanentError, RenderError, Unprocessable

EVENT = EventVars(event_id="e1", author_id="school", kind="closure",
                  payload={"date": "2026-12-03", "rooms": [1, 2]})


def template(**locales: tuple[str, str]) -> Template:
    return Template({tag.replace("_", "-"): LocaleText(*text) for tag, text in locales.items()})


def run(t: Template, locale: str | None = "en", **data: object) -> tuple[str, str, str]:
    out = render("closure", t, locale, data=data, event=EVENT, user_id="u42")
    return out.title, out.body, out.locale


def test_variables_data_event_and_user_id() -> None:
    t = template(en=("{{ event.kind | title }} on {{ event.payload.date }}",
                     "Hi {{ user_id }}, {{ data.school }} ({{ event.author_id }}, "
                     "{{ event.event_id }}) rooms {{ event.payload.rooms | join(',') }}"))
    assert run(t, school="Elm") == (
        "Closure on 2026-12-03", "Hi u42, Elm (school, e1) rooms 1,2", "en")


@pytest.mark.parametrize(("wanted", "chosen"), [
    ("fr-CA", "fr-CA"), ("fr-ca", "fr-CA"), ("fr-BE", "fr"), ("fr", "fr"), ("de-DE", "en"),
    ("pt", "en"), (None, "en"), ("", "en"),
])
def test_locale_choice_exact_then_language_then_en(wanted: str | None, chosen: str) -> None:
    assert choose_locale(["en", "fr", "fr-CA"], wanted) == chosen
    t = template(en=("en", "x"), fr=("fr", "x"), fr_CA=("fr-CA", "x"))
    assert run(t, wanted)[0] == chosen


def test_check_requires_en_and_names_the_field_that_does_not_compile() -> None:
    with pytest.raises(Unprocessable) as missing:
        check_template(template(fr=("a", "b")))
    assert missing.value.field == "locales.en" and missing.value.status == 422
    with pytest.raises(Unprocessable) as broken:
        check_template(template(en=("ok", "ok"), fr=("ok", "{% if %}")))
    assert broken.value.field == "locales.fr.body" and broken.value.code == "invalid_template"
    with pytest.raises(Unprocessable) as unclosed:
        check_template(template(en=("{{ data.x ", "ok")))
    assert unclosed.value.field == "locales.en.title"
    with pytest.raises(Unprocessable) as tag:
        check_template(template(en=("a", "b"), **{"x y": ("a", "b")}))
    assert tag.value.code == "invalid_locale"
    check_template(template(en=("{{ data.a }}", "{% for r in event.payload.rooms %}{{ r }}"
                                "{% endfor %}"), pt_BR=("a", "b")))


@pytest.mark.parametrize("source", [
    "{{ data.missing }}",  # strict: a variable the event lacks is an error, not a blank
    "{{ data.a.b.c }}",
    "{{ 1 / 0 }}",
    "{{ ''.__class__.__mro__ }}",  # the sandbox refuses unsafe attributes
    "{{ 'x' * 100000000 }}",  # output bounded
    "{{ 2 ** 100000 }}",
    "{% for i in range(10) %}" + "y" * (MAX_OUTPUT_CHARS // 9) + "{% endfor %}",
])
def test_render_errors_are_render_error(source: str) -> None:
    with pytest.raises(RenderError) as info:
        run(template(en=("t", source)), a=1)
    assert isinstance(info.value, PermanentError)
    assert info.value.reason == "render_error"
    assert (info.value.field, info.value.locale, info.value.template) == ("body", "en", "closure")


def test_defaults_and_defined_tests_stay_available() -> None:
    t = template(en=("Hi {{ data.name | default('there') }}",
                     "{% if data.extra is defined %}{{ data.extra }}{% else %}none{% endif %}"))
    assert run(t)[:2] == ("Hi there", "none")
    assert run(t, name="Ann", extra="x")[:2] == ("Hi Ann", "x")


def test_output_is_plain_text() -> None:
    assert run(template(en=("{{ data.v }}", "b")), v="<b>&</b>")[0] == "<b>&</b>"

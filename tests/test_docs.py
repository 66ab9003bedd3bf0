"""The settings documentation is generated from setting.py and kept in step with it."""

from __future__ import annotations

import pytest

from laion5b import config
from tools import settings_doc


def test_settings_doc_is_up_to_date() -> None:
    generated = settings_doc.render(settings_doc.SETTING.read_text(encoding="utf-8"), settings_doc.load_setting())
    current = settings_doc.TARGET.read_text(encoding="utf-8")
    assert current == generated, f"docs/settings.md differs from setting.py: run {settings_doc.COMMAND}"


def test_every_setting_is_documented() -> None:
    text = settings_doc.TARGET.read_text(encoding="utf-8")
    for name in config.setting_types():
        assert f"| `{name}` | `{config.env_variable(name)}` |" in text


def test_a_setting_without_a_comment_is_refused() -> None:
    source = settings_doc.SETTING.read_text(encoding="utf-8").replace(
        'thread_num = 32  # download threads per downloader process (engine "threads")', "thread_num = 32"
    )
    with pytest.raises(settings_doc.UndocumentedSetting, match="thread_num"):
        settings_doc.render(source, settings_doc.load_setting())

"""``cartesia_language``: BCP-47 tags (what ConversationRelay and SDK ``locale`` send) → Cartesia codes."""

from __future__ import annotations

import pytest

from bridge.cartesia.protocol import LANGUAGES, cartesia_language


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("en", "en"),
        ("en-US", "en"),
        ("es-MX", "es"),
        ("pt-BR", "pt"),
        ("PT_br", "pt"),
        ("fr-CA", "fr"),
        ("zh-Hant-TW", "zh"),
        ("cmn-Hans-CN", "zh"),
        ("nb-NO", "no"),
        ("fil-PH", "tl"),
        ("iw-IL", "he"),
        ("ur-PK", "ur"),
    ],
)
def test_regional_and_alias_tags_map_to_the_cartesia_language(tag: str, expected: str) -> None:
    assert cartesia_language(tag) == expected


def test_every_cartesia_code_maps_to_itself() -> None:
    assert {cartesia_language(code) for code in LANGUAGES} == LANGUAGES


@pytest.mark.parametrize("tag", ["xx-YY", "klingon", "", "en--US", "e", "123", "en US"])
def test_unknown_or_malformed_tags_raise_naming_the_tag(tag: str) -> None:
    with pytest.raises(ValueError) as info:
        cartesia_language(tag)
    assert repr(tag) in str(info.value)

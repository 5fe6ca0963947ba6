"""What the emulator's recogniser can hear: tone-voice words indexed by their pitch (no I/O).

A tone voice renders a token at ``tone_word_frequency(token, voice offset)`` whole Hz for
``tone_word_ms(token)`` ms at speed 1 (``voices``). ``Vocabulary`` indexes every known token
under that frequency for every tone voice's offset: the tokens the emulator's tone voices
rendered (``add_rendered``: raw, lower-cased, punctuation kept, since it changes the pitch;
bounded, least recently rendered forgotten first) and ``BUILTIN_WORDS``, common English words
(a real recogniser has a vocabulary too) minus those that would sound identical to a more
common one (same letter count, same ``crc32 % 400``).
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from .voices import TONE_VOICES, normalize_word, tone_word_frequency, tone_word_ms

#: Pitch offsets (Hz) of the tone voices, in catalogue order (the tie-break order).
VOICE_OFFSETS: Final = tuple(int(v.param) for v in TONE_VOICES)
#: Rendered words remembered (oldest forgotten first).
MAX_RENDERED_WORDS: Final = 50_000
RANK_RENDERED: Final = 0
RANK_BUILTIN: Final = 1

#: Common English words, most common first (our own list; collisions pruned at load).
BUILTIN_WORDS: Final = """
the of and to a in is it you that he was for on are with as i his they be at one have this from or had
by hot but some what there we can out other were all your when up use word how said an each she which
do their time if will way about many then them would write like so these her long make thing see him two
has look more day could go come did my sound no most number who over know water than call first people
may down side been now find any new work part take get place made live where after back little only round
man year came show every good me give our under name very through just form much great think say help low
line before turn cause same mean differ move right boy old too does tell sentence set three want air well
also play small end put home read hand port large spell add even land here must big high such follow act
why ask men change went light kind off need house picture try us again animal point mother world near build
self earth father head stand own page should country found answer school grow study still learn plant cover
food sun four thought let keep eye never last door between city tree cross since hard start might story saw
far sea draw left late run while press close night real life few stop open seem together next white children
begin got walk example ease paper often always music those both mark book letter until mile river car feet
care second group carry took rain eat room friend began idea fish mountain north once base hear horse cut
sure watch color face wood main enough plain girl usual young ready above ever red list though feel talk
bird soon body dog family direct pose leave song measure state product black short numeral class wind
question happen complete ship area half rock order fire south problem piece told knew pass farm top whole
king size heard best hour better true during hundred am remember step early hold west ground interest reach
fast five sing listen six table travel less morning ten simple several vowel toward war lay against pattern
slow center love person money serve appear road map science rule govern pull cold notice voice fall power
town fine certain fly unit lead cry dark machine note wait plan figure star box noun field rest correct able
pound done beauty drive stood contain front teach week final gave green oh quick develop sleep warm free
minute strong special mind behind clear tail produce fact street inch lot nothing course stay wheel full
force blue object decide surface deep moon island foot yet busy test record boat common gold possible plane
age dry wonder laugh thousand ago ran check game shape yes cool miss brought heat snow bed bring sit perhaps
fill east weight language among hello thanks thank please sorry okay account order pay bill phone call agent
today tomorrow yesterday appointment cancel speak operator problem help billing address email number
""".split()


@dataclass(slots=True, eq=False)
class VocabularyEntry:
    text: str  # normalised, what the transcript says
    ms: int  # tone_word_ms at speed 1
    offset: int
    rank: int
    seq: int = 0  # when last rendered (higher = later); 0 for built-in words


class Vocabulary:
    """Words the recogniser can hear: rendered tokens (bounded, LRU) plus ``BUILTIN_WORDS``.

    Indexed by tone frequency (Hz, integer) for every tone voice offset. Adding a
    rendered token is O(voices); ``MAX_RENDERED_WORDS`` bounds it (oldest evicted).
    """

    def __init__(self, builtin: Iterable[str] = BUILTIN_WORDS, max_rendered: int = MAX_RENDERED_WORDS) -> None:
        self._by_freq: dict[int, list[VocabularyEntry]] = {}
        #: token → where its entries sit in ``_by_freq`` (for refresh and eviction).
        self._rendered: OrderedDict[str, list[tuple[int, VocabularyEntry]]] = OrderedDict()
        self._max_rendered = max_rendered
        self._seq = 0
        self.builtin: list[str] = []
        seen: set[tuple[int, int]] = set()
        for word in builtin:
            token = word.lower()
            # Same letter count and same crc32 % 400: identical audio; the commoner word wins.
            key = (tone_word_ms(token), zlib.crc32(token.encode("utf-8")) % 400)
            if key in seen:
                continue
            seen.add(key)
            self.builtin.append(token)
            self._index(token, RANK_BUILTIN)

    def _index(self, token: str, rank: int) -> list[tuple[int, VocabularyEntry]]:
        text, ms = normalize_word(token), tone_word_ms(token)
        placed: list[tuple[int, VocabularyEntry]] = []
        for offset in VOICE_OFFSETS:
            freq = tone_word_frequency(token, offset)
            entries = self._by_freq.setdefault(freq, [])
            entry = VocabularyEntry(text, ms, offset, rank, self._seq if rank == RANK_RENDERED else 0)
            if rank == RANK_RENDERED:
                entries.insert(0, entry)  # the latest rendered first
            else:
                entries.append(entry)
            placed.append((freq, entry))
        return placed

    def add_rendered(self, text: str) -> None:
        """Record every whitespace-separated token of ``text`` a tone voice rendered.

        A token rendered again becomes the latest again: among identical-sounding rendered
        words, the one rendered last is heard. Cheap when nothing changes (the TTS hot path).
        """
        rendered = self._rendered
        for token in text.lower().split():
            self._seq += 1
            placed = rendered.get(token)
            if placed is not None:
                rendered.move_to_end(token)
                for freq, entry in placed:
                    entry.seq = self._seq
                    entries = self._by_freq[freq]
                    if entries[0] is not entry:
                        entries.remove(entry)
                        entries.insert(0, entry)
                continue
            rendered[token] = self._index(token, RANK_RENDERED)
            if len(rendered) > self._max_rendered:
                _old, old_placed = rendered.popitem(last=False)
                for freq, entry in old_placed:
                    self._by_freq[freq].remove(entry)

    def rendered(self) -> list[str]:
        """Rendered tokens (lower-cased, punctuation kept), oldest first."""
        return list(self._rendered)

    def near(self, freq: float, tolerance: float) -> list[tuple[int, VocabularyEntry]]:
        """(tone frequency, entry) of every voice/word within ``tolerance`` Hz of ``freq``."""
        out: list[tuple[int, VocabularyEntry]] = []
        for f in range(math.floor(freq - tolerance), math.ceil(freq + tolerance) + 1):
            if abs(f - freq) <= tolerance:
                out.extend((f, e) for e in self._by_freq.get(f, ()))
        return out

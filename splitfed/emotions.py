"""The seven KDEF emotions, in one fixed order that every label index refers to."""

from __future__ import annotations

EMOTIONS: tuple[str, ...] = (
    "afraid",
    "angry",
    "disgusted",
    "happy",
    "neutral",
    "sad",
    "surprised",
)
NUM_CLASSES = len(EMOTIONS)

# KDEF's two-letter codes, in the order of EMOTIONS.
KDEF_CODES: dict[str, int] = {"AF": 0, "AN": 1, "DI": 2, "HA": 3, "NE": 4, "SA": 5, "SU": 6}

_SYNONYMS: dict[str, str] = {
    "afraid": "afraid",
    "fear": "afraid",
    "fearful": "afraid",
    "scared": "afraid",
    "angry": "angry",
    "anger": "angry",
    "mad": "angry",
    "disgust": "disgusted",
    "disgusted": "disgusted",
    "happy": "happy",
    "happiness": "happy",
    "joy": "happy",
    "neutral": "neutral",
    "calm": "neutral",
    "sad": "sad",
    "sadness": "sad",
    "surprise": "surprised",
    "surprised": "surprised",
}

# FER2013's label order: 0 angry, 1 disgust, 2 fear, 3 happy, 4 sad, 5 surprise, 6 neutral.
FER2013_TO_INDEX: dict[int, int] = {0: 1, 1: 2, 2: 0, 3: 3, 4: 5, 5: 6, 6: 4}


def emotion_index(name: str) -> int | None:
    """Map a class-folder name (any case, common synonyms, KDEF code) to a label index."""
    key = name.strip().lower()
    if key in _SYNONYMS:
        return EMOTIONS.index(_SYNONYMS[key])
    if name.strip().upper() in KDEF_CODES:
        return KDEF_CODES[name.strip().upper()]
    return None

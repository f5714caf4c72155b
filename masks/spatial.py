"""The spatial vocabulary: the phrases that place objects in a prompt, as pure data.

masks/prompt.py treats them as separators between entity groups; masks/layout.py reads their meaning.
"""

# Relations between two objects ("between": three), and
# places of one object in the picture. Both separate groups.
RELATION_PHRASES = {
    **{f"{lead}{side} of": f"{side} of" for side in ("left", "right")
       for lead in ("", "to the ", "on the ", "to the far ", "on the far ")},
    **{f"{lead} the {side} side of": f"{side} of" for side in ("left", "right") for lead in ("to", "on")},
    **{f"{lead} the {side} hand side of": f"{side} of" for side in ("left", "right") for lead in ("to", "on")},
    "above": "above", "over": "above", "on top of": "above", "atop": "above",
    "below": "below", "under": "below", "beneath": "below", "underneath": "below",
    "beside": "beside", "next to": "beside", "alongside": "beside",
    "between": "between", "in between": "between",
    "behind": "behind", "in front of": "in front of",
}
PLACE_PHRASES = {
    **{f"{lead} the {side}": f"place:{side}" for side in ("left", "right")
       for lead in ("on", "to", "at", "in")},
    **{f"on the {side} side": f"place:{side}" for side in ("left", "right")},
    **{f"{lead} the far {side}": f"place:{side}" for side in ("left", "right") for lead in ("on", "to", "at")},
    **{f"{lead} the {side}": f"place:{side}" for side in ("top", "bottom") for lead in ("at", "on", "in")},
    "at the very top": "place:top", "at the very bottom": "place:bottom",
    **{f"{lead} the {middle}": "place:middle" for middle in ("middle", "center", "centre")
       for lead in ("in", "at")},
    **{f"{lead} the {v}{joint}{h}{corner}": f"place:{'top' if v in ('top', 'upper') else 'bottom'} {h}"
       for v in ("top", "bottom", "upper", "lower") for h in ("left", "right") for joint in (" ", "-")
       for lead in ("in", "at", "on") for corner in ("", " corner")},
}

# What a place phrase placing the picture's frame reads as ("on the left of the image"), not an object.
FRAME_WORDS = {"image", "picture", "frame", "photo", "photograph", "scene", "canvas", "composition", "shot", "view"}
POSSESSIVES = {"his", "her", "its", "their", "my", "your", "our"}

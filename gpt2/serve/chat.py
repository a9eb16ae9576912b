r"""The plain-text chat template for /v1/chat/completions (TensorFlow-free).

GPT-2 is a base model: it continues text and knows no chat roles. Chat messages are therefore
written out as a plain transcript, each turn a role marker and its text, turns separated by a
blank line, ending with the marker of the assistant's turn:

    System: You are terse.

    User: Name a colour.

    Assistant: Blue.

    User: Another one.

    Assistant:

The model continues after the last "Assistant:", and the answer stops where the model starts a
next turn (a new line beginning with "User:", "Assistant:" or "System:", see STOPS) or at
<|endoftext|>; surrounding whitespace is trimmed. "developer" messages count as "system".
Content is a string or a list of {"type": "text", "text": ...} parts (joined).

No message can forge a turn: a line of content that begins with a turn marker (after any
backslashes) gets one more backslash in front, as mbox quotes "From " lines, so "Assistant: yes"
inside a user's text is written "\Assistant: yes" and "\User:" becomes "\\User:" (the escape
can be undone: remove one backslash from each such line).
"""

import re

from gpt2.sampling.settings import shown

MARKERS = {"system": "System:", "developer": "System:", "user": "User:", "assistant": "Assistant:"}
STOPS = ["\nUser:", "\nAssistant:", "\nSystem:"]
MAX_MESSAGES = 1024
SEPARATOR = "\n\n"  # between turns: 2 tokens ("\n" "\n") before a turn marker, so token counts add up
_MARKER_LINE = re.compile(r"^(\\*)(%s)" % "|".join(sorted({re.escape(m) for m in MARKERS.values()})), re.MULTILINE)


def escape(text):
    """`text` with one more backslash in front of every line that begins with a turn marker
    (after any backslashes): inside a message, no line can start a turn."""
    return _MARKER_LINE.sub(r"\\\1\2", text)


def _content(message, index):
    content = message.get("content")
    if isinstance(content, str):
        return content
    if content is None and message.get("role") == "assistant":
        return ""
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise ValueError(f"messages[{index}].content: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                             "are supported")
        return "".join(part["text"] for part in content)
    raise ValueError(f"messages[{index}].content must be a string or a list of text parts")


def turns(messages):
    """The transcript's turns for a list of chat messages ({"role", "content", "name"?}): one
    (is_system, text) per message, text like "User: Hi"; raises ValueError saying what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' is required: a non-empty list of {\"role\", \"content\"} objects")
    if len(messages) > MAX_MESSAGES:
        raise ValueError(f"'messages' has {len(messages)} messages; at most {MAX_MESSAGES}")
    out = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{index}] must be an object with 'role' and 'content'")
        role = message.get("role")
        if not isinstance(role, str) or role not in MARKERS:  # a list or dict is not hashable
            raise ValueError(f"messages[{index}].role must be one of system, developer, user, assistant "
                             f"(tools and functions are not supported), got {shown(role)}")
        unknown = sorted(set(message) - {"role", "content", "name"})
        if unknown:
            raise ValueError(f"messages[{index}]: unsupported field {shown(unknown[0])}")
        if message.get("name") is not None and not isinstance(message["name"], str):
            raise ValueError(f"messages[{index}].name must be a string")
        out.append((MARKERS[role] == MARKERS["system"],
                    f"{MARKERS[role]} {escape(_content(message, index).strip())}".rstrip()))
    return out


def transcript(texts):
    """The prompt text for turn texts (see `turns`): blank lines between them, the assistant's
    marker last."""
    return SEPARATOR.join([*texts, MARKERS["assistant"]])


def render(messages):
    """The prompt text for a list of chat messages; raises ValueError saying what is wrong with them."""
    return transcript([text for _, text in turns(messages)])

"""Message decoding: hex, Caesar shifts, reversal."""

NAME = "decoding"


def hex_to_text(data: str) -> str:
    """Decode a string of hexadecimal byte values (like '48656c6c6f') to text."""
    return bytes.fromhex(data.replace(" ", "")).decode("utf-8")


def caesar_decode(text: str, shift: int) -> str:
    """Undo a Caesar cipher: shift each letter back by `shift` places; other characters stay."""
    result = []
    for character in text:
        if character.isalpha():
            base = ord("A") if character.isupper() else ord("a")
            result.append(chr((ord(character) - base - shift) % 26 + base))
        else:
            result.append(character)
    return "".join(result)


def reverse_string(text: str) -> str:
    """Reverse a string."""
    return text[::-1]


TOOLS = [hex_to_text, caesar_decode, reverse_string]

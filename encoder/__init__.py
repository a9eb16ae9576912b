"""GPT-2 byte-level BPE encoder, token for token identical to OpenAI's.

>>> from encoder import get_encoder
>>> enc = get_encoder()            # the GPT-2 vocabulary shipped with this package
>>> enc.encode("Hello world")
[15496, 995]
>>> enc.decode([15496, 995])
'Hello world'
"""

from encoder.encoder import (
    EOT_TEXT,
    PRETOKEN_PATTERN,
    Encoder,
    StreamDecoder,
    bpe_merge,
    bytes_to_unicode,
    encoder_files_for_model_dir,
    encoder_for_model_dir,
    get_encoder,
    read_encoder_json,
    read_text_chunks,
    read_vocab_bpe,
)

__all__ = [
    "EOT_TEXT",
    "PRETOKEN_PATTERN",
    "Encoder",
    "StreamDecoder",
    "bpe_merge",
    "bytes_to_unicode",
    "encoder_files_for_model_dir",
    "encoder_for_model_dir",
    "get_encoder",
    "read_encoder_json",
    "read_text_chunks",
    "read_vocab_bpe",
]

"""Site data: JSONL records, chat-template encoding with answer-only labels, ICD-10 demo sites."""

from fed_llama.data.records import Example, read_jsonl, write_jsonl
from fed_llama.data.source import SiteData, load_site_data
from fed_llama.data.tokenize import IGNORE, Encoded, encode

__all__ = ["IGNORE", "Encoded", "Example", "SiteData", "encode", "load_site_data", "read_jsonl",
           "write_jsonl"]

"""gill-client: stream multimodal dialogue from a GILL Triton server, typed, sync or asyncio.

    from gill_client import GillClient, ChatOptions, TextDelta, ImageEvent

    with GillClient("localhost:8001") as client:
        for event in client.chat("show me a red circle", ChatOptions(max_new_tokens=32)):
            ...

See ``client/README.md`` for conversations, images in and out, cancellation, deadlines, TLS and API keys.
"""

from gill_client._transport import API_KEY_HEADER, TLS
from gill_client.aio import AsyncChatStream, AsyncGillClient
from gill_client.conversation import AsyncConversation, Conversation
from gill_client.errors import (
    Cancelled,
    DeadlineExceeded,
    GillClientError,
    Internal,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unknown,
)
from gill_client.events import Done, Event, ImageEvent, Notice, Preview, TextDelta
from gill_client.messages import Message, assistant, user
from gill_client.options import ChatOptions, RetryPolicy
from gill_client.reply import Reply
from gill_client.sync import ChatStream, GillClient

__version__ = "0.1.0"

__all__ = [
    "API_KEY_HEADER", "TLS", "AsyncChatStream", "AsyncConversation", "AsyncGillClient", "Cancelled", "ChatOptions",
    "ChatStream", "Conversation", "DeadlineExceeded", "Done", "Event", "GillClient", "GillClientError", "ImageEvent",
    "Internal", "InvalidArgument", "Message", "NotFound", "Notice", "Preview", "Reply", "ResourceExhausted",
    "RetryPolicy", "TextDelta", "Unauthenticated", "Unavailable", "Unknown", "assistant", "user",
]

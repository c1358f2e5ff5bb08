"""Chat on top of the pipeline: sessions, snapshots, tuned state files, user folders.

Importing this package loads torch but never textual.
"""
from .session import ChatReply, ChatSession, Message, clean_user_message
from .snapshot import SnapshotInfo, list_snapshots
from .state_files import StateFileInfo, list_state_files, read_state_file_info, save_state_file
from .store import ConversationInfo, ConversationStore

__all__ = [
    "ChatReply",
    "ChatSession",
    "ConversationInfo",
    "ConversationStore",
    "Message",
    "SnapshotInfo",
    "StateFileInfo",
    "clean_user_message",
    "list_snapshots",
    "list_state_files",
    "read_state_file_info",
    "save_state_file",
]

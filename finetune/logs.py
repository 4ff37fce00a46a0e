"""Console log format: tables and progress lines plain; warnings and errors marked with their level."""

from __future__ import annotations

import logging


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        if record.levelno >= logging.WARNING:
            return f"{record.levelname}: {message}"
        return message

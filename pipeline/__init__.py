"""The hot-folder pipeline: watched inboxes whose images come out styled with a preset."""

"""The node controller: a pure registration policy, its handlers, and the server."""

"""The consumer runtime both workers run: consume, dispatch, reply, ack; and its parts."""

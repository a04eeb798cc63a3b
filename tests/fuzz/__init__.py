"""Request fuzzing: a real regproxy process fed generated (valid, invalid and hostile) HTTP requests."""

"""The wire: generated protobuf messages, tensor (de)serialization and framing of large messages."""

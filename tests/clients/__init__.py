"""Scripts that drive the emulator with other Cartesia clients, each in its own process and path."""

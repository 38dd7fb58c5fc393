"""``dagan cam``: the avatar as a virtual camera for OBS, Zoom, Meet or Teams (local engine or remote)."""

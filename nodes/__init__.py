"""ComfyUI node classes of the pack (thin wrappers over `wan_models`)."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

"""Where the CLI puts what the model made: images (and other non-text parts) saved under a folder,
next to a markdown page of the conversation, so a terminal user can open them. What the act head found
(boxes, masks, keypoints) is also drawn on the image it looked at (`generation.overlay`)."""

from __future__ import annotations

import json
from pathlib import Path

from mmbridge.generation import part_to_dict, part_to_text


class OutputWriter:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        self.turn = 0

    def write(self, request: str, result, image=None) -> list[Path]:
        """Save the turn's non-text parts and append the turn to `chat.md`; returns the files written. With
        `image` (the PIL image the model looked at), detections and keypoints also get an overlay PNG."""
        self.turn += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        lines, saved = [f"**you:** {request}", "", "**model:**"], []
        for k, part in enumerate(result.parts):
            if part.type == "text":
                lines.append(part.text)
            elif part.type == "image":
                path = self.directory / f"turn{self.turn:03d}-{k}.png"
                part.image.save(path)
                saved.append(path)
                lines.append(f"![{path.name}]({path.name})")
            else:
                path = self.directory / f"turn{self.turn:03d}-{k}.json"
                path.write_text(json.dumps(part_to_dict(part)) + "\n")
                saved.append(path)
                lines.append(f"`{part_to_text(part)}` ([{path.name}]({path.name}))")
                if image is not None and part.type in ("detections", "keypoints"):
                    from mmbridge.generation.overlay import draw_overlay

                    overlay = path.with_name(f"{path.stem}-overlay.png")
                    draw_overlay(image, part).save(overlay)
                    saved.append(overlay)
                    lines.append(f"![{overlay.name}]({overlay.name})")
        with (self.directory / "chat.md").open("a") as f:
            f.write("\n".join(lines) + "\n\n")
        return saved

"""Colours and fonts shared by the panels (light, dark pairs as customtkinter takes them)."""

from __future__ import annotations

import tkinter.font

import customtkinter as ctk

ERROR_COLOUR = ("#c62828", "#ff6b6b")
WARNING_COLOUR = ("#9a5b00", "#f0b35a")
MUTED_COLOUR = ("gray40", "gray65")
OK_COLOUR = ("#2e7d32", "#7bd88f")


def mono_font(size: int = 12) -> ctk.CTkFont:
    """The platform's fixed-width family, so the banner's rules and the tier table line up."""
    family = tkinter.font.nametofont("TkFixedFont").actual()["family"]
    return ctk.CTkFont(family=family, size=size)


def heading_font(size: int = 15) -> ctk.CTkFont:
    return ctk.CTkFont(size=size, weight="bold")

"""The node pair (claims 3 and 12): the mirror link, lease keeping, partner loss, takeover."""

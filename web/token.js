// Tokens in page addresses, shared by the call page, /live, /watch and /broadcast.

// A token or stream key in the address (?token=...) must not stay in the address bar, the history or bookmarks:
// it is taken out at once and kept for this tab only (a reload uses it again).
export function takeToken(query, scope) {
  const key = `chorus-token:${scope}`;
  const fromUrl = query.get('token');
  if (fromUrl) {
    sessionStorage.setItem(key, fromUrl);
    query.delete('token');
    history.replaceState(null, '', `${location.pathname}${query.size ? `?${query}` : ''}${location.hash}`);
  }
  return fromUrl || sessionStorage.getItem(key) || undefined;
}

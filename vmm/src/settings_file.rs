//! The settings file shared by `vmm run` and the containerd shim (`/etc/skiff/skiff.toml`,
//! written by `tools/install`), and where an installed Skiff keeps its guest.
//!
//! The format is a TOML subset: `key = value` lines, `#` comments (outside strings),
//! `[section]` lines ignored, integers and double-quoted strings (no escapes). What each key
//! means is the reader's business; this module only splits lines.

/// The system-wide settings file.
pub const SYSTEM_FILE: &str = "/etc/skiff/skiff.toml";
/// Where `tools/install` puts the guest kernel.
pub const INSTALLED_KERNEL: &str = "/usr/local/share/skiff/vmlinux";
/// Where `tools/install` puts the initramfs with the agent.
pub const INSTALLED_INITRD: &str = "/usr/local/share/skiff/initramfs.cpio";

/// One `key = value` line: its number (from 1), the key, and the value without quotes; or
/// the line's number and what is wrong with it.
pub type Entry<'a> = Result<(usize, &'a str, &'a str), (usize, String)>;

/// The `key = value` entries of a settings text, in order (blank, comment and section lines
/// skipped).
pub fn entries(text: &str) -> impl Iterator<Item = Entry<'_>> {
    text.lines().enumerate().filter_map(|(i, raw)| {
        let n = i + 1;
        let line = strip_comment(raw).trim();
        if line.is_empty() || line.starts_with('[') {
            return None;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Some(Err((n, format!("expected `key = value`, got {line:?}"))));
        };
        let v = v.trim();
        let v = match v.strip_prefix('"') {
            Some(q) => match q.strip_suffix('"') {
                Some(q) => q,
                None => return Some(Err((n, format!("unterminated string {v}")))),
            },
            None => v,
        };
        Some(Ok((n, k.trim(), v)))
    })
}

/// The value of `key` in the file at `path` (the last one wins), if the file is readable and
/// has it; unreadable files and malformed lines count as absent.
pub fn lookup(path: &std::path::Path, keys: &[&str]) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    entries(&text)
        .filter_map(Result::ok)
        .filter(|(_, k, _)| keys.contains(k))
        .last()
        .map(|(_, _, v)| v.to_string())
}

fn strip_comment(line: &str) -> &str {
    let mut in_str = false;
    for (i, c) in line.char_indices() {
        match c {
            '"' => in_str = !in_str,
            '#' if !in_str => return &line[..i],
            _ => {}
        }
    }
    line
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn lines_keys_values_and_errors() {
        let t =
            "# c\n[vm]\nkernel = \"/k # not a comment\" # comment\ncpus=2\nbad line\nx = \"open\n";
        let e: Vec<_> = entries(t).collect();
        assert_eq!(e[0], Ok((3, "kernel", "/k # not a comment")));
        assert_eq!(e[1], Ok((4, "cpus", "2")));
        assert_eq!(
            e[2],
            Err((5, "expected `key = value`, got \"bad line\"".into()))
        );
        assert_eq!(e[3], Err((6, "unterminated string \"open".into())));
        assert_eq!(e.len(), 4);
    }

    #[test]
    fn lookup_takes_the_last_of_any_key() {
        let p = std::env::temp_dir().join(format!("skiff-settings-{}.toml", std::process::id()));
        std::fs::write(&p, "initrd = \"/a\"\ninitramfs = \"/b\"\n").unwrap();
        assert_eq!(lookup(&p, &["initrd", "initramfs"]).as_deref(), Some("/b"));
        assert_eq!(lookup(&p, &["kernel"]), None);
        let _ = std::fs::remove_file(&p);
        assert_eq!(lookup(&p, &["kernel"]), None);
    }
}

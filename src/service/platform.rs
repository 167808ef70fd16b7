//! Whether a machine's operating system can run "restrict app execution" at
//! all, judged from Defender's `osPlatform` before any POST is spent.
//!
//! Microsoft documents the action for Windows 10 (1709 and later), Windows 11
//! and Windows Server 2019 and later (learn.microsoft.com, "Take response
//! actions on a device"). A POST for any other platform only earns a 400
//! `OsPlatformNotSupported` after spending a slot of the restrict API's
//! hourly budget, which is the scarce thing in an outbreak. Only values
//! known not to qualify are refused: a platform name Defender adds later goes
//! through, and Defender's own refusal stays the last word.

/// `osPlatform` values of systems that cannot be restricted, compared without
/// regard to case (the API's spelling has varied: `macOS`, `MacOS`).
const UNSUPPORTED: &[&str] = &[
    "macOS",
    "Linux",
    "iOS",
    "Android",
    "Windows7",
    "Windows8",
    "Windows8.1",
    "WindowsServer2008R2",
    "WindowsServer2012",
    "WindowsServer2012R2",
    "WindowsServer2016",
];

/// `Some(platform)` when the machine's `osPlatform` is known not to support
/// the action; `None` when it does or is not known here.
pub fn known_unsupported(os_platform: Option<&str>) -> Option<&str> {
    let platform = os_platform?.trim();
    UNSUPPORTED
        .iter()
        .any(|known| known.eq_ignore_ascii_case(platform))
        .then_some(platform)
}

#[cfg(test)]
mod tests {
    use super::known_unsupported;

    #[test]
    fn only_platforms_known_not_to_qualify_are_refused() {
        for refused in [
            "macOS",
            "MacOS",
            "Linux",
            "iOS",
            "Android",
            "Windows7",
            "Windows8.1",
            "WindowsServer2008R2",
            "WindowsServer2012R2",
            "WindowsServer2016",
        ] {
            assert_eq!(known_unsupported(Some(refused)), Some(refused), "{refused}");
        }
        for allowed in [
            "Windows10",
            "Windows11",
            "WindowsServer2019",
            "WindowsServer2022",
            "WindowsServer2025",
            "WindowsServer2028",
            "",
        ] {
            assert_eq!(known_unsupported(Some(allowed)), None, "{allowed}");
        }
        assert_eq!(known_unsupported(None), None);
    }
}

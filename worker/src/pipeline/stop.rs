//! Stop strings: text that may be the start of one is held back.

/// Holds back text that might be the start of a stop string.
pub(crate) struct StopScan {
    stops: Vec<String>,
    out: String,
    sent: usize,
}

impl StopScan {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        StopScan {
            stops,
            out: String::new(),
            sent: 0,
        }
    }
}

impl StopScan {
    /// Adds text; returns (text safe to send, whether a stop string matched).
    pub(crate) fn push(&mut self, text: &str) -> (String, bool) {
        self.out.push_str(text);
        let from = self
            .sent
            .saturating_sub(self.stops.iter().map(|s| s.len()).max().unwrap_or(0));
        let from = (0..=from)
            .rev()
            .find(|&i| self.out.is_char_boundary(i))
            .unwrap_or(0);
        let hit = self
            .stops
            .iter()
            .filter(|s| !s.is_empty())
            .filter_map(|s| self.out[from..].find(s.as_str()).map(|p| p + from))
            .min();
        if let Some(pos) = hit {
            let pos = pos.max(self.sent);
            let send = self.out[self.sent..pos].to_string();
            self.sent = self.out.len();
            return (send, true);
        }
        let hold = self
            .stops
            .iter()
            .map(|s| s.len())
            .max()
            .unwrap_or(1)
            .saturating_sub(1);
        let mut safe = self.out.len().saturating_sub(hold).max(self.sent);
        while !self.out.is_char_boundary(safe) {
            safe -= 1;
        }
        let send = self.out[self.sent..safe].to_string();
        self.sent = safe;
        (send, false)
    }

    pub(crate) fn flush(&mut self) -> String {
        let s = self.out[self.sent..].to_string();
        self.sent = self.out.len();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_hold_back_and_cut() {
        let scan = |stops: &[&str]| StopScan {
            stops: stops.iter().map(|s| s.to_string()).collect(),
            out: String::new(),
            sent: 0,
        };
        // Text that may start a stop string is held back, the rest is sent.
        let mut s = scan(&["END"]);
        assert_eq!(s.push("hello E"), ("hello".into(), false));
        assert_eq!(s.push("N"), (" ".into(), false));
        assert_eq!(s.push("Dxyz"), ("".into(), true));
        assert_eq!(s.out[..s.out.find("END").unwrap()], *"hello ");
        let mut s = scan(&[]);
        assert_eq!(s.push("abc"), ("abc".into(), false));
        let mut s = scan(&["\n\n"]);
        assert_eq!(s.push("a\n"), ("a".into(), false));
        assert_eq!(s.push("b"), ("\n".into(), false));
        assert_eq!(s.flush(), "b");
        // Multi-byte characters are never split.
        let mut s = scan(&["é!"]);
        assert_eq!(s.push("caféé"), ("café".into(), false));
        assert_eq!(s.push("!"), ("".into(), true));
    }
}

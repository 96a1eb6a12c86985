//! A cap on what one client address may hold at once (connections still logging in, HTTP
//! requests in flight), so one host cannot take every slot from all the others.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Places per address, up to `max` each; an address's entry goes away with its last place.
#[derive(Clone)]
pub struct AddressSlots {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    max: usize,
}

/// One address's place, given back on drop.
pub struct AddressSlot {
    counts: Arc<Mutex<HashMap<IpAddr, usize>>>,
    address: IpAddr,
}

impl AddressSlots {
    pub fn new(max: usize) -> Self {
        Self {
            counts: Arc::default(),
            max,
        }
    }

    /// A place for `address`, or `None` if it holds `max` already.
    pub fn take(&self, address: IpAddr) -> Option<AddressSlot> {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(address).or_default();
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            counts: self.counts.clone(),
            address,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.address);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_gets_its_own_places_back_on_drop() {
        let slots = AddressSlots::new(2);
        let (a, b): (IpAddr, IpAddr) = ("127.0.0.1".parse().unwrap(), "::1".parse().unwrap());
        let first = slots.take(a).unwrap();
        let _second = slots.take(a).unwrap();
        assert!(slots.take(a).is_none());
        assert!(slots.take(b).is_some(), "another address is not affected");
        drop(first);
        assert!(slots.take(a).is_some());
        drop(_second);
        assert!(
            slots.counts.lock().unwrap().is_empty(),
            "no entry left behind"
        );
    }
}

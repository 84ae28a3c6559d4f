//! CPU-bound work over large slices, spread over the machine's cores with scoped threads (the
//! decryption and decoding of every record when the whole configuration is read).

use std::num::NonZeroUsize;

/// Below this many items a slice is handled on the calling thread.
const MIN_PER_THREAD: usize = 4096;

/// `f` over consecutive chunks of `items`, one chunk per core (one chunk for small slices); the
/// results in the chunks' order. `f` may take what it keeps out of the items instead of
/// copying it. Blocks the calling thread until every chunk is done.
pub fn map_chunks<T: Send, R: Send>(items: &mut [T], f: impl Fn(&mut [T]) -> R + Sync) -> Vec<R> {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    let threads = cores.min(items.len() / MIN_PER_THREAD).max(1);
    if threads == 1 {
        return vec![f(items)];
    }
    let size = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let f = &f;
        let handles: Vec<_> = items
            .chunks_mut(size)
            .map(|chunk| scope.spawn(move || f(chunk)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_item_once_in_order() {
        for n in [0, 1, 4095, 4096 * 3 + 7] {
            let mut items: Vec<usize> = (0..n).collect();
            let parts = map_chunks(&mut items, |c| c.to_vec());
            assert_eq!(parts.concat(), (0..n).collect::<Vec<_>>(), "{n} items");
        }
    }
}
